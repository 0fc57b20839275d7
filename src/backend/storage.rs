//! Buffers a backend owns, and windows into them.
//!
//! The model borrows ranges of its buffers all the time: one parameter inside the flat parameter
//! buffer, one layer's gradient inside the flat gradient buffer, the first `rows` rows of a
//! workspace sized for the largest batch. [`Storage`] is that one capability, implemented by the
//! CPU's slices (`[f32]`, a window is `&[f32]`) and by the CUDA backend's device buffers (a
//! window is a borrow-checked view of the parent allocation). Every backend operation takes
//! whole storages and checks their lengths against its dimensions.

use crate::error::{Error, Result};
use std::ops::{Deref, DerefMut, Range};

/// A run of elements in a backend's memory, with shared and exclusive windows.
pub trait Storage {
    /// The element type as the backend stores it.
    type Elem: Copy;
    /// A read-only window (borrows `self`).
    type Ref<'a>: Deref<Target = Self>
    where
        Self: 'a;
    /// A writable window (borrows `self` exclusively).
    type Mut<'a>: DerefMut<Target = Self>
    where
        Self: 'a;

    /// Number of elements.
    fn len(&self) -> usize;

    /// Whether it holds no element.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `range`, read-only.
    fn window(&self, range: Range<usize>) -> Result<Self::Ref<'_>>;

    /// Several pairwise disjoint writable windows at once (a layer's weight and bias gradients
    /// inside the flat gradient buffer).
    fn windows_mut<const N: usize>(
        &mut self,
        ranges: [Range<usize>; N],
    ) -> Result<[Self::Mut<'_>; N]>;

    /// Elements `range`, writable.
    fn window_mut(&mut self, range: Range<usize>) -> Result<Self::Mut<'_>> {
        let [w] = self.windows_mut([range])?;
        Ok(w)
    }

    /// The first `len` elements, read-only.
    fn head(&self, len: usize) -> Result<Self::Ref<'_>> {
        self.window(0..len)
    }

    /// The first `len` elements, writable.
    fn head_mut(&mut self, len: usize) -> Result<Self::Mut<'_>> {
        self.window_mut(0..len)
    }
}

/// Refuses a window outside a buffer of `len` elements, or overlapping windows.
pub fn check_windows(op: &'static str, len: usize, ranges: &[Range<usize>]) -> Result<()> {
    for (i, r) in ranges.iter().enumerate() {
        if r.start > r.end || r.end > len {
            return Err(Error::shape(
                op,
                format!(
                    "window {}..{} outside a buffer of {len} elements",
                    r.start, r.end
                ),
            ));
        }
        let overlaps = ranges[..i]
            .iter()
            .any(|q| r.start < q.end && q.start < r.end && !r.is_empty() && !q.is_empty());
        if overlaps {
            return Err(Error::shape(
                op,
                format!("window {}..{} overlaps another window", r.start, r.end),
            ));
        }
    }
    Ok(())
}

impl<T: Copy> Storage for [T] {
    type Elem = T;
    type Ref<'a>
        = &'a [T]
    where
        T: 'a;
    type Mut<'a>
        = &'a mut [T]
    where
        T: 'a;

    fn len(&self) -> usize {
        <[T]>::len(self)
    }

    fn window(&self, range: Range<usize>) -> Result<&[T]> {
        check_windows("window", self.len(), std::slice::from_ref(&range))?;
        Ok(&self[range])
    }

    fn windows_mut<const N: usize>(&mut self, ranges: [Range<usize>; N]) -> Result<[&mut [T]; N]> {
        check_windows("window_mut", self.len(), &ranges)?;
        let base = self.as_mut_ptr();
        Ok(ranges.map(|r| {
            // SAFETY: every range lies inside `self` and the ranges are pairwise disjoint
            // (checked above); `self` stays exclusively borrowed for the windows' lifetime.
            unsafe { std::slice::from_raw_parts_mut(base.add(r.start), r.len()) }
        }))
    }
}

/// A buffer that grows to the largest length a step asks for and keeps its capacity: the
/// number of masked patches changes every step, so buffers sized by it expose only their
/// current length. Allocation goes through the backend (`alloc`), so it is counted there.
#[derive(Debug)]
pub struct Grow<Buf> {
    buf: Option<Buf>,
    capacity: usize,
    len: usize,
}

impl<Buf> Default for Grow<Buf> {
    fn default() -> Self {
        Grow {
            buf: None,
            capacity: 0,
            len: 0,
        }
    }
}

impl<Buf, S> Grow<Buf>
where
    Buf: DerefMut<Target = S>,
    S: Storage + ?Sized,
{
    /// Sets the current length, allocating (zeroed) only when it exceeds the capacity.
    pub fn resize(&mut self, len: usize, alloc: impl FnOnce(usize) -> Result<Buf>) -> Result<()> {
        self.reserve(len, alloc)?;
        self.len = len;
        Ok(())
    }

    /// Makes the capacity at least `capacity` (contents are not kept when it grows), so later
    /// [`Grow::resize`] calls up to it allocate nothing.
    pub fn reserve(
        &mut self,
        capacity: usize,
        alloc: impl FnOnce(usize) -> Result<Buf>,
    ) -> Result<()> {
        if self.buf.is_none() || self.capacity < capacity {
            self.buf = Some(alloc(capacity.max(1))?);
            self.capacity = capacity.max(1);
            self.len = self.len.min(capacity);
        }
        Ok(())
    }

    /// The current length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the current length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn buffer(&self) -> Result<&S> {
        self.buf.as_deref().ok_or_else(unsized_buffer)
    }

    /// The first `len` elements, read-only.
    pub fn get(&self) -> Result<S::Ref<'_>> {
        self.buffer()?.head(self.len)
    }

    /// The first `len` elements, writable.
    pub fn get_mut(&mut self) -> Result<S::Mut<'_>> {
        self.rows_mut(0..self.len)
    }

    /// Refuses a window reaching past the current length.
    fn check_within(&self, range: &Range<usize>) -> Result<()> {
        if range.end > self.len {
            return Err(Error::shape(
                "workspace window",
                format!("{range:?} beyond the current length {}", self.len),
            ));
        }
        Ok(())
    }

    /// Elements `range` of the current length, read-only.
    pub fn rows(&self, range: Range<usize>) -> Result<S::Ref<'_>> {
        self.check_within(&range)?;
        self.buffer()?.window(range)
    }

    /// Elements `range` of the current length, writable.
    pub fn rows_mut(&mut self, range: Range<usize>) -> Result<S::Mut<'_>> {
        self.check_within(&range)?;
        let buf = self.buf.as_deref_mut().ok_or_else(unsized_buffer)?;
        buf.window_mut(range)
    }
}

fn unsized_buffer() -> Error {
    Error::Unsupported("a workspace buffer was used before it was sized".into())
}

/// A workspace struct generic over the backend `B`, with a `Default` that leaves every field at
/// its default (empty buffers, no state). `#[derive(Default)]` would also demand `B: Default`,
/// which a device backend is not.
macro_rules! workspace {
    ($(#[$meta:meta])* $vis:vis struct $name:ident<B: Backend> {
        $($(#[$fmeta:meta])* $fvis:vis $field:ident: $ty:ty,)*
    }) => {
        $(#[$meta])*
        $vis struct $name<B: Backend> {
            $($(#[$fmeta])* $fvis $field: $ty,)*
        }

        impl<B: Backend> Default for $name<B> {
            fn default() -> Self {
                $name { $($field: Default::default(),)* }
            }
        }
    };
}
pub(crate) use workspace;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_windows_are_checked_and_disjoint() {
        let mut v: Vec<f32> = (0..10).map(|i| i as f32).collect();
        assert_eq!(v.window(2..4).unwrap(), &[2.0, 3.0]);
        assert!(v.window(5..11).is_err());
        let [a, b] = v.windows_mut([0..2, 8..10]).unwrap();
        a[0] = -1.0;
        b[1] = -2.0;
        assert_eq!((v[0], v[9]), (-1.0, -2.0));
        assert!(v.windows_mut([0..5, 4..6]).is_err());
        assert!(v.windows_mut([3..3, 3..3]).is_ok());
    }

    #[test]
    fn grow_keeps_capacity_and_exposes_its_length() {
        let mut g: Grow<Vec<f32>> = Grow::default();
        let mut allocs = 0;
        let mut alloc = |n: usize| {
            allocs += 1;
            Ok(vec![0f32; n])
        };
        g.resize(8, &mut alloc).unwrap();
        g.resize(3, &mut alloc).unwrap();
        assert_eq!((g.len(), g.get().unwrap().len()), (3, 3));
        g.resize(8, &mut alloc).unwrap();
        assert_eq!(allocs, 1);
        assert!(g.rows_mut(4..9).is_err());
    }
}

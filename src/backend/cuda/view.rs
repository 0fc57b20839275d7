//! Borrowed windows of device buffers: a parameter inside the flat parameter buffer, one
//! layer's gradient inside the flat gradient buffer, one crop's rows inside an activation.
//!
//! Every launcher takes `&CudaSlice<T>` / `&mut CudaSlice<T>` and checks lengths against its
//! dimensions. A window is a non-owning `CudaSlice` over `[start, end)` of its parent (built with
//! cudarc's `upgrade_device_ptr`, never freed: it is leaked back on drop), wrapped so that the
//! borrow checker ties it to the parent: [`SubSlice`] to a shared borrow, [`SubSliceMut`] to an
//! exclusive one. They deref to `CudaSlice<T>`, so launchers take them unchanged.
//!
//! The backend disables cudarc's per-buffer event tracking (one stream), so a window carries no
//! events and dropping it touches nothing on the device.

use super::{Error, Result};
use crate::backend::{check_windows, Storage};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut, Range};

/// A read-only window of a device buffer.
pub struct SubSlice<'a, T> {
    window: ManuallyDrop<CudaSlice<T>>,
    _parent: PhantomData<&'a CudaSlice<T>>,
}

/// A writable window of a device buffer.
pub struct SubSliceMut<'a, T> {
    window: ManuallyDrop<CudaSlice<T>>,
    _parent: PhantomData<&'a mut CudaSlice<T>>,
}

impl<T> Deref for SubSlice<'_, T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.window
    }
}

impl<T> Deref for SubSliceMut<'_, T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.window
    }
}

impl<T> DerefMut for SubSliceMut<'_, T> {
    /// Only for passing the window to a launcher; swapping an owned buffer into it would leak
    /// that buffer.
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.window
    }
}

/// Gives the window back without freeing the parent's memory (drops only the stream handle).
fn release<T>(window: &mut ManuallyDrop<CudaSlice<T>>) {
    // SAFETY: the window is taken exactly once, in drop, and never used after.
    let window = unsafe { ManuallyDrop::take(window) };
    let _ = window.leak();
}

impl<T> Drop for SubSlice<'_, T> {
    fn drop(&mut self) {
        release(&mut self.window);
    }
}

impl<T> Drop for SubSliceMut<'_, T> {
    fn drop(&mut self) {
        release(&mut self.window);
    }
}

fn check_range(op: &'static str, parent_len: usize, range: &Range<usize>) -> Result<()> {
    if range.start > range.end || range.end > parent_len {
        return Err(Error::shape(
            op,
            format!(
                "window {}..{} outside a buffer of {parent_len} elements",
                range.start, range.end
            ),
        ));
    }
    Ok(())
}

/// An owned device buffer as the [`crate::backend::Backend`] seam hands it out: it derefs to
/// the `CudaSlice` every launcher takes.
#[derive(Debug)]
pub struct DevBuf<T>(pub CudaSlice<T>);

impl<T> Deref for DevBuf<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.0
    }
}

impl<T> DerefMut for DevBuf<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.0
    }
}

impl<T: Copy> Storage for CudaSlice<T> {
    type Elem = T;
    type Ref<'a>
        = SubSlice<'a, T>
    where
        T: 'a;
    type Mut<'a>
        = SubSliceMut<'a, T>
    where
        T: 'a;

    fn len(&self) -> usize {
        CudaSlice::len(self)
    }

    fn window(&self, range: Range<usize>) -> Result<SubSlice<'_, T>> {
        check_range("cuda window", self.len(), &range)?;
        let stream = self.stream().clone();
        let (base, _record) = self.device_ptr(stream.as_ref());
        let ptr = base + (range.start * std::mem::size_of::<T>()) as u64;
        // SAFETY: `ptr..ptr + len` lies inside `self` (checked above), which outlives the window;
        // the window is never freed (see `release`).
        let window = unsafe { stream.upgrade_device_ptr::<T>(ptr, range.len()) };
        Ok(SubSlice {
            window: ManuallyDrop::new(window),
            _parent: PhantomData,
        })
    }

    fn windows_mut<const N: usize>(
        &mut self,
        ranges: [Range<usize>; N],
    ) -> Result<[SubSliceMut<'_, T>; N]> {
        check_windows("cuda window_mut", self.len(), &ranges)?;
        let stream = self.stream().clone();
        let (base, _record) = self.device_ptr_mut(stream.as_ref());
        let size = std::mem::size_of::<T>() as u64;
        Ok(ranges.map(|r| {
            // SAFETY: each window lies inside `self` (checked), the windows are pairwise disjoint
            // (checked), and `self` stays exclusively borrowed for as long as they live.
            let window =
                unsafe { stream.upgrade_device_ptr::<T>(base + r.start as u64 * size, r.len()) };
            SubSliceMut {
                window: ManuallyDrop::new(window),
                _parent: PhantomData,
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::check_range;

    #[test]
    fn windows_outside_the_buffer_are_refused() {
        assert!(check_range("t", 10, &(0..10)).is_ok());
        assert!(check_range("t", 10, &(3..3)).is_ok());
        assert!(check_range("t", 10, &(5..11)).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 6..5;
        assert!(check_range("t", 10, &backwards).is_err());
    }
}

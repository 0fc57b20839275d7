//! A small pickle machine for PyTorch checkpoints: the opcodes `torch.save` emits (protocols 2
//! to 5), building plain values. Nothing is ever executed: a call (`REDUCE`, `NEWOBJ`) of a
//! known constructor (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, ...) builds
//! the matching value; any other call becomes an opaque [`PVal::Object`] that the reader skips.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A tensor as `_rebuild_tensor_v2` describes it: a view into a storage.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// A storage named by a persistent id: `('storage', torch.FloatStorage, '<key>', 'cpu', numel)`.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageRef {
    /// The storage class name (`FloatStorage`, `HalfStorage`, `BFloat16Storage`, ...).
    pub class: String,
    /// The archive entry `data/<key>`.
    pub key: String,
    pub numel: usize,
}

/// A pickled value.
#[derive(Clone, Debug)]
pub enum PVal {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<PVal>),
    /// Lists and dicts are shared and mutable, as in Python (a memoised container is filled
    /// after it is stored).
    List(Rc<RefCell<Vec<PVal>>>),
    Dict(Rc<RefCell<Vec<(PVal, PVal)>>>),
    /// A `module.name` reference (a class or function).
    Global(String, String),
    Storage(StorageRef),
    Tensor(TensorRef),
    /// A call the reader does not model (kept only so the stack stays consistent).
    Object(String),
}

impl PVal {
    fn dict() -> PVal {
        PVal::Dict(Rc::new(RefCell::new(Vec::new())))
    }

    /// Short description for error messages.
    pub fn kind(&self) -> String {
        match self {
            PVal::None => "None".into(),
            PVal::Bool(b) => format!("bool {b}"),
            PVal::Int(i) => format!("int {i}"),
            PVal::Float(f) => format!("float {f}"),
            PVal::Str(_) => "str".into(),
            PVal::Bytes(b) => format!("{} bytes", b.len()),
            PVal::Tuple(_) => "tuple".into(),
            PVal::List(_) => "list".into(),
            PVal::Dict(_) => "dict".into(),
            PVal::Global(m, n) => format!("{m}.{n}"),
            PVal::Storage(_) => "storage".into(),
            PVal::Tensor(_) => "tensor".into(),
            PVal::Object(what) => format!("object from {what}"),
        }
    }
}

enum Item {
    Mark,
    Val(PVal),
}

/// Runs the pickle program in `data` and returns the value it builds.
pub fn load(data: &[u8]) -> Result<PVal, String> {
    Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Item>,
    memo: HashMap<u32, PVal>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| format!("pickle truncated at byte {}", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("pickle: unterminated text line")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn utf8(&mut self, n: usize) -> Result<String, String> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|e| format!("pickle: bad UTF-8: {e}"))
    }

    fn push(&mut self, v: PVal) {
        self.stack.push(Item::Val(v));
    }
    fn pop(&mut self) -> Result<PVal, String> {
        match self.stack.pop() {
            Some(Item::Val(v)) => Ok(v),
            Some(Item::Mark) => Err("pickle: unexpected mark".into()),
            None => Err("pickle: stack underflow".into()),
        }
    }
    fn top(&self) -> Result<&PVal, String> {
        match self.stack.last() {
            Some(Item::Val(v)) => Ok(v),
            _ => Err("pickle: nothing to memoise".into()),
        }
    }
    /// Pops everything down to the last mark.
    fn pop_mark(&mut self) -> Result<Vec<PVal>, String> {
        let mut items = Vec::new();
        loop {
            match self.stack.pop() {
                Some(Item::Val(v)) => items.push(v),
                Some(Item::Mark) => break,
                None => return Err("pickle: missing mark".into()),
            }
        }
        items.reverse();
        Ok(items)
    }
    fn memo_get(&self, i: u32) -> Result<PVal, String> {
        self.memo
            .get(&i)
            .cloned()
            .ok_or_else(|| format!("pickle: memo entry {i} missing"))
    }

    fn run(mut self) -> Result<PVal, String> {
        loop {
            let op = self.u8()?;
            if let Some(v) = self.literal(op)? {
                self.push(v);
            } else if !self.memo_op(op)? && !self.structure_op(op)? {
                match op {
                    b'.' => return self.pop(),
                    b'P' => {
                        return Err("pickle: text persistent ids are not used by torch.save".into())
                    }
                    other => {
                        return Err(format!(
                            "pickle opcode 0x{other:02x} at byte {} is not supported",
                            self.pos - 1
                        ))
                    }
                }
            }
        }
    }

    /// Opcodes that push one value read from the stream (numbers, strings, bytes, globals and
    /// empty containers); `None` for every other opcode.
    fn literal(&mut self, op: u8) -> Result<Option<PVal>, String> {
        let text_str = |s: &[u8]| PVal::Str(String::from_utf8_lossy(s).into_owned());
        Ok(Some(match op {
            b'N' => PVal::None,
            0x88 => PVal::Bool(true),
            0x89 => PVal::Bool(false),
            b'K' => PVal::Int(self.u8()? as i64),
            b'M' => PVal::Int(self.u16()? as i64),
            b'J' => PVal::Int(self.u32()? as i32 as i64),
            0x8a => {
                let n = self.u8()? as usize;
                let b = self.take(n)?;
                if n > 8 {
                    return Err("pickle: integer wider than 64 bits".into());
                }
                let mut v: i64 = 0;
                for (i, &byte) in b.iter().enumerate() {
                    v |= (byte as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                PVal::Int(v)
            }
            b'I' => match self.line()?.as_str() {
                "00" => PVal::Bool(false),
                "01" => PVal::Bool(true),
                t => PVal::Int(t.parse().map_err(|_| format!("pickle: bad INT {t}"))?),
            },
            b'L' => {
                let text = self.line()?;
                let v = text.trim_end_matches('L').parse();
                PVal::Int(v.map_err(|_| format!("pickle: bad LONG {text}"))?)
            }
            b'G' => {
                let mut a = [0u8; 8];
                a.copy_from_slice(self.take(8)?);
                PVal::Float(f64::from_be_bytes(a))
            }
            b'X' => {
                let n = self.u32()? as usize;
                PVal::Str(self.utf8(n)?)
            }
            0x8c => {
                let n = self.u8()? as usize;
                PVal::Str(self.utf8(n)?)
            }
            0x8d => {
                let n = self.u64()? as usize;
                PVal::Str(self.utf8(n)?)
            }
            b'U' => {
                let n = self.u8()? as usize;
                text_str(self.take(n)?)
            }
            b'T' => {
                let n = self.u32()? as usize;
                text_str(self.take(n)?)
            }
            b'C' => {
                let n = self.u8()? as usize;
                PVal::Bytes(self.take(n)?.to_vec())
            }
            b'B' => {
                let n = self.u32()? as usize;
                PVal::Bytes(self.take(n)?.to_vec())
            }
            0x8e => {
                let n = self.u64()? as usize;
                PVal::Bytes(self.take(n)?.to_vec())
            }
            b'c' => {
                let module = self.line()?;
                PVal::Global(module, self.line()?)
            }
            b')' => PVal::Tuple(Vec::new()),
            b']' => PVal::List(Rc::new(RefCell::new(Vec::new()))),
            b'}' => PVal::dict(),
            0x8f => PVal::Object("set".into()),
            _ => return Ok(None),
        }))
    }

    /// The memo opcodes (PUT and GET in their forms); `false` for every other opcode.
    fn memo_op(&mut self, op: u8) -> Result<bool, String> {
        let index = |text: String, what: &str| {
            text.parse::<u32>()
                .map_err(|_| format!("pickle: bad {what} index"))
        };
        match op {
            b'q' | b'r' | 0x94 | b'p' => {
                let i = match op {
                    b'q' => self.u8()? as u32,
                    b'r' => self.u32()?,
                    0x94 => self.memo.len() as u32,
                    _ => index(self.line()?, "PUT")?,
                };
                let v = self.top()?.clone();
                self.memo.insert(i, v);
            }
            b'h' | b'j' | b'g' => {
                let i = match op {
                    b'h' => self.u8()? as u32,
                    b'j' => self.u32()?,
                    _ => index(self.line()?, "GET")?,
                };
                let v = self.memo_get(i)?;
                self.push(v)
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Opcodes that rearrange the stack: marks, containers built from stack items, calls, and
    /// the protocol header; `false` for every other opcode.
    fn structure_op(&mut self, op: u8) -> Result<bool, String> {
        match op {
            0x80 => {
                let proto = self.u8()?;
                if proto > 5 {
                    return Err(format!("pickle protocol {proto} is not supported"));
                }
            }
            0x95 => {
                self.u64()?; // FRAME: a length hint only
            }
            b'(' => self.stack.push(Item::Mark),
            b't' => {
                let items = self.pop_mark()?;
                self.push(PVal::Tuple(items))
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push(PVal::Tuple(items))
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.push(PVal::List(Rc::new(RefCell::new(items))))
            }
            b'd' => {
                let items = self.pop_mark()?;
                let d = PVal::dict();
                set_items(&d, items)?;
                self.push(d)
            }
            b'a' | b'e' => {
                let items = if op == b'a' {
                    vec![self.pop()?]
                } else {
                    self.pop_mark()?
                };
                match self.top()? {
                    PVal::List(l) => l.borrow_mut().extend(items),
                    other => return Err(format!("pickle: APPEND(S) to {}", other.kind())),
                }
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                set_items(self.top()?, vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                set_items(self.top()?, items)?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (PVal::Str(m), PVal::Str(n)) => self.push(PVal::Global(m, n)),
                    _ => return Err("pickle: STACK_GLOBAL needs two strings".into()),
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = persistent_load(pid)?;
                self.push(v)
            }
            // REDUCE, NEWOBJ and NEWOBJ_EX (whose keyword arguments torch never needs).
            b'R' | 0x81 | 0x92 => {
                if op == 0x92 {
                    self.pop()?;
                }
                let args = self.pop()?;
                let func = self.pop()?;
                let v = call(func, args)?;
                self.push(v)
            }
            b'b' => {
                // BUILD sets attributes (e.g. a state dict's `_metadata`): nothing to keep.
                let _state = self.pop()?;
                self.top()?;
            }
            b'0' => {
                self.pop()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.push(v)
            }
            0x90 => {
                self.pop_mark()?;
            }
            0x91 => {
                self.pop_mark()?;
                self.push(PVal::Object("frozenset".into()))
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

fn set_items(target: &PVal, items: Vec<PVal>) -> Result<(), String> {
    let PVal::Dict(d) = target else {
        // Items set on an opaque object (e.g. a custom mapping): ignore.
        return Ok(());
    };
    if items.len() % 2 != 0 {
        return Err("pickle: odd number of dict items".into());
    }
    let mut d = d.borrow_mut();
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        d.push((k, v));
    }
    Ok(())
}

/// `('storage', <class>, key, location, numel)` → a storage reference.
fn persistent_load(pid: PVal) -> Result<PVal, String> {
    let PVal::Tuple(items) = pid else {
        return Err(format!(
            "persistent id is a {}, expected a tuple",
            pid.kind()
        ));
    };
    match items.as_slice() {
        [PVal::Str(tag), class, PVal::Str(key), _location, PVal::Int(numel)]
            if tag == "storage" =>
        {
            let class = match class {
                PVal::Global(_, name) => name.clone(),
                other => other.kind(),
            };
            Ok(PVal::Storage(StorageRef {
                class,
                key: key.clone(),
                numel: usize::try_from(*numel).map_err(|_| "negative storage size")?,
            }))
        }
        _ => Err("persistent id is not a torch storage".into()),
    }
}

fn ints(v: &PVal, what: &str) -> Result<Vec<usize>, String> {
    match v {
        PVal::Tuple(items) => items
            .iter()
            .map(|x| match x {
                PVal::Int(i) if *i >= 0 => Ok(*i as usize),
                other => Err(format!("tensor {what}: {} is not a size", other.kind())),
            })
            .collect(),
        other => Err(format!(
            "tensor {what} is a {}, expected a tuple",
            other.kind()
        )),
    }
}

/// Applies a known constructor; anything else gives an opaque object.
fn call(func: PVal, args: PVal) -> Result<PVal, String> {
    let PVal::Global(module, name) = &func else {
        return Ok(PVal::Object(func.kind()));
    };
    let args = match args {
        PVal::Tuple(a) => a,
        other => vec![other],
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") | ("builtins", "dict") => Ok(PVal::dict()),
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
            let (storage, offset, size, stride) = match args.as_slice() {
                [PVal::Storage(s), PVal::Int(o), size, stride, ..] => (s, *o, size, stride),
                _ => return Err("_rebuild_tensor_v2: unexpected arguments".into()),
            };
            let shape = ints(size, "size")?;
            let stride = ints(stride, "stride")?;
            if shape.len() != stride.len() {
                return Err("_rebuild_tensor_v2: size and stride differ in rank".into());
            }
            Ok(PVal::Tensor(TensorRef {
                storage: storage.clone(),
                offset: usize::try_from(offset).map_err(|_| "negative storage offset")?,
                shape,
                stride,
            }))
        }
        // nn.Parameter(data, requires_grad, hooks): the data is the tensor.
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            Ok(args.into_iter().next().unwrap_or(PVal::None))
        }
        // Tensor subclasses: (func, type, args, state) → func(*args).
        ("torch._tensor", "_rebuild_from_type_v2") => match args.as_slice() {
            [f, _, inner, ..] => call(f.clone(), inner.clone()),
            _ => Err("_rebuild_from_type_v2: unexpected arguments".into()),
        },
        _ => Ok(PVal::Object(format!("{module}.{name}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(program: &[u8]) -> PVal {
        load(program).unwrap()
    }

    #[test]
    fn integers_floats_and_memo() {
        // LONG1 -2 (one byte 0xfe), BININT -5, BINFLOAT 1.5, in a tuple.
        let mut p = vec![0x80, 2, b'(', 0x8a, 1, 0xfe, b'J'];
        p.extend_from_slice(&(-5i32).to_le_bytes());
        p.push(b'G');
        p.extend_from_slice(&1.5f64.to_be_bytes());
        p.extend_from_slice(&[b't', b'q', 0, b'0', b'h', 0, b'.']);
        match run(&p) {
            PVal::Tuple(items) => {
                assert!(matches!(items[0], PVal::Int(-2)));
                assert!(matches!(items[1], PVal::Int(-5)));
                assert!(matches!(items[2], PVal::Float(f) if f == 1.5));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn memoised_dict_sees_later_items() {
        // d = {}; memo[0] = d; d['a'] = 1; then return (d, memo[0]) — both hold 'a'.
        let p = [
            0x80, 2, b'}', b'q', 0, 0x8c, 1, b'a', b'K', 1, b's', b'h', 0, 0x86, b'.',
        ];
        match run(&p) {
            PVal::Tuple(items) => {
                for item in items {
                    let PVal::Dict(d) = item else { panic!() };
                    assert_eq!(d.borrow().len(), 1);
                }
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_and_unknown_programs_fail() {
        assert!(load(&[0x80, 2, b'X', 10, 0])
            .unwrap_err()
            .contains("truncated"));
        assert!(load(&[0x80, 2, 0xff]).unwrap_err().contains("0xff"));
        assert!(load(&[0x80, 2, b'.']).unwrap_err().contains("underflow"));
    }
}

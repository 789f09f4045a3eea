//! A pickle reader that never executes anything, for PyTorch checkpoints.
//!
//! The virtual machine understands the opcodes of protocols 0–5 but only builds data:
//! `None`/bool/int/float/str/bytes, tuples, lists, dicts, sets, `collections.OrderedDict`,
//! `torch.Size`, tensors (`torch._utils._rebuild_tensor_v2`, `_rebuild_tensor`,
//! `_rebuild_parameter`, `torch._tensor._rebuild_from_type_v2`) and storages (persistent ids
//! `('storage', torch.<X>Storage, key, location, numel)`). Every other global, call (`REDUCE`),
//! object creation (`NEWOBJ`, `OBJ`, `INST`) or `BUILD` yields an inert placeholder; the names of
//! such globals are collected so tools can list them.
//!
//! Values live in an arena indexed by [`Id`], so memo references (`BINGET`) share instead of
//! copying and no value is recursive in Rust: memory is linear in the pickle size and dropping
//! never recurses. Limits ([`Limits`]) bound the pickle size, the number of values, the memo
//! and the mark stack.

use std::collections::{BTreeSet, HashMap};

use crate::dtype::Dtype;

/// Index of a value in [`Pickle::nodes`].
pub type Id = u32;

/// Resource limits of the pickle VM.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest pickle stream accepted, in bytes.
    pub max_bytes: usize,
    /// Most values the arena may hold (also the deepest value stack).
    pub max_nodes: usize,
    /// Most memo entries.
    pub max_memo: usize,
    /// Deepest nesting of `MARK`s.
    pub max_marks: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // A real SDXL checkpoint's data.pkl is well under 1 MB (about 150 bytes and 15 values per
        // tensor); these bounds leave room for optimizer states while keeping memory under ~1 GB.
        Limits {
            max_bytes: 64 << 20,
            max_nodes: 8 << 20,
            max_memo: 8 << 20,
            max_marks: 1 << 16,
        }
    }
}

/// A storage reference from a persistent id: one `<archive>/data/<key>` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    /// Entry name under `data/`.
    pub key: String,
    /// Element type, `None` for a storage class we do not handle.
    pub dtype: Option<Dtype>,
    /// The storage class name as pickled (`"HalfStorage"`, ...).
    pub type_name: String,
    /// Number of elements of the storage.
    pub numel: u64,
}

/// A tensor: a strided view into a storage, as `_rebuild_tensor_v2` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    /// The storage the elements live in.
    pub storage: StorageRef,
    /// Offset of element 0, in elements.
    pub offset: u64,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Element strides, one per dimension.
    pub stride: Vec<usize>,
}

/// One value built by the VM.
#[derive(Debug, Clone)]
pub enum Node {
    /// `None`.
    None,
    /// `True`/`False`.
    Bool(bool),
    /// An integer that fits in `i64`.
    Int(i64),
    /// A larger integer: its little-endian two's-complement bytes.
    BigInt(Vec<u8>),
    /// A float.
    Float(f64),
    /// A str.
    Str(String),
    /// bytes or bytearray.
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Id>),
    /// A list.
    List(Vec<Id>),
    /// A dict (or OrderedDict) in insertion order; a repeated key keeps both entries.
    Dict(Vec<(Id, Id)>),
    /// A set or frozenset.
    Set(Vec<Id>),
    /// A reference to `module.name`, never resolved.
    Global {
        /// Module path.
        module: String,
        /// Attribute name.
        name: String,
    },
    /// A storage from a persistent id.
    Storage(StorageRef),
    /// A tensor.
    Tensor(TensorRef),
    /// An inert placeholder for a call or object creation that was not performed.
    Opaque {
        /// `module.name` of the callable or class, or `"<object>"`.
        callable: String,
        /// The argument tuple it would have been called with.
        args: Id,
    },
}

/// A loaded pickle: the arena, the root value and what was ignored.
#[derive(Debug)]
pub struct Pickle {
    /// All values; containers refer to others by [`Id`].
    pub nodes: Vec<Node>,
    /// The value `STOP` returned.
    pub root: Id,
    /// Bytes consumed (the position after `STOP`).
    pub consumed: usize,
    /// `module.name` of every global outside the understood set, sorted.
    pub ignored_globals: BTreeSet<String>,
    /// `module.name` of callables whose call was replaced by a placeholder, in first-seen order.
    pub calls: Vec<String>,
    /// Class names of objects whose creation was replaced by a placeholder, first-seen order.
    pub objects: Vec<String>,
}

/// Failure of the VM: byte offset and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickleError {
    /// Offset of the failing opcode in the stream.
    pub offset: u64,
    /// What went wrong.
    pub reason: String,
}

type R<T> = std::result::Result<T, PickleError>;

const STORAGE_CLASSES: [&str; 12] = [
    "DoubleStorage",
    "FloatStorage",
    "HalfStorage",
    "BFloat16Storage",
    "LongStorage",
    "IntStorage",
    "ShortStorage",
    "CharStorage",
    "ByteStorage",
    "BoolStorage",
    "UntypedStorage",
    "TypedStorage",
];

/// Whether `module.name` is a global this reader understands (not reported as ignored).
fn is_known_global(module: &str, name: &str) -> bool {
    match module {
        "collections" => name == "OrderedDict",
        "torch._utils" => matches!(
            name,
            "_rebuild_tensor_v2"
                | "_rebuild_tensor"
                | "_rebuild_parameter"
                | "_rebuild_parameter_with_state"
        ),
        "torch._tensor" => name == "_rebuild_from_type_v2",
        "torch" | "torch.storage" => {
            name == "Size"
                || name == "Tensor"
                || STORAGE_CLASSES.contains(&name)
                || Dtype::from_torch_dtype(name).is_some()
        }
        "torch.nn.parameter" => name == "Parameter",
        _ => false,
    }
}

/// Runs the VM on `data` (one pickle, up to and including its `STOP`).
///
/// # Errors
/// A [`PickleError`] for malformed streams, unsupported opcodes (extension registry,
/// out-of-band buffers), exceeded [`Limits`], and `_rebuild_tensor_v2` calls whose arguments are
/// not (storage, offset, size, stride, ...).
pub fn load(data: &[u8], limits: Limits) -> R<Pickle> {
    // The stream may be followed by other data (legacy checkpoints); only the prefix within the
    // limit is interpreted.
    let capped = data.len() > limits.max_bytes;
    let mut vm = Vm {
        data: &data[..data.len().min(limits.max_bytes)],
        capped,
        pos: 0,
        op_pos: 0,
        limits,
        nodes: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        ignored: BTreeSet::new(),
        calls: Vec::new(),
        objects: Vec::new(),
    };
    let root = vm.run()?;
    Ok(Pickle {
        nodes: vm.nodes,
        root,
        consumed: vm.pos,
        ignored_globals: vm.ignored,
        calls: vm.calls,
        objects: vm.objects,
    })
}

struct Vm<'a> {
    data: &'a [u8],
    capped: bool,
    pos: usize,
    op_pos: usize,
    limits: Limits,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
    ignored: BTreeSet<String>,
    calls: Vec<String>,
    objects: Vec<String>,
}

impl<'a> Vm<'a> {
    fn err<T>(&self, reason: impl Into<String>) -> R<T> {
        Err(PickleError {
            offset: self.op_pos as u64,
            reason: reason.into(),
        })
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        if n > self.data.len() - self.pos {
            if self.capped {
                return self.over_limit();
            }
            return self.err(format!(
                "needs {n} bytes but only {} remain (truncated pickle?)",
                self.data.len() - self.pos
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn over_limit<T>(&self) -> R<T> {
        self.err(format!(
            "pickle longer than the {}-byte limit",
            self.limits.max_bytes
        ))
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> R<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> R<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> R<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn len64(&mut self) -> R<usize> {
        let n = self.u64()?;
        usize::try_from(n).or_else(|_| self.err(format!("length {n} does not fit in memory")))
    }

    fn line(&mut self) -> R<&'a str> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            if self.capped {
                return self.over_limit();
            }
            return self.err("unterminated text line");
        };
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).or_else(|_| self.err("text line is not UTF-8"))
    }

    fn push_node(&mut self, n: Node) -> R<Id> {
        if self.nodes.len() >= self.limits.max_nodes {
            return self.err(format!(
                "more than {} values (limit)",
                self.limits.max_nodes
            ));
        }
        self.nodes.push(n);
        Ok((self.nodes.len() - 1) as Id)
    }

    fn push_id(&mut self, id: Id) -> R<()> {
        if self.stack.len() >= self.limits.max_nodes {
            return self.err(format!(
                "stack deeper than {} values (limit)",
                self.limits.max_nodes
            ));
        }
        self.stack.push(id);
        Ok(())
    }

    fn push(&mut self, n: Node) -> R<()> {
        let id = self.push_node(n)?;
        self.stack.push(id);
        Ok(())
    }

    fn pop(&mut self) -> R<Id> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.err("stack underflow");
        }
        Ok(self.stack.pop().expect("length checked"))
    }

    fn top(&self) -> R<Id> {
        match self.stack.last() {
            Some(&t) => Ok(t),
            None => self.err("stack is empty"),
        }
    }

    fn pop_mark(&mut self) -> R<Vec<Id>> {
        let Some(m) = self.marks.pop() else {
            return self.err("no MARK on the stack");
        };
        if m > self.stack.len() {
            return self.err("MARK above the stack top");
        }
        Ok(self.stack.split_off(m))
    }

    fn memo_put(&mut self, idx: u32) -> R<()> {
        let t = self.top()?;
        if self.memo.len() >= self.limits.max_memo && !self.memo.contains_key(&idx) {
            return self.err(format!(
                "more than {} memo entries (limit)",
                self.limits.max_memo
            ));
        }
        self.memo.insert(idx, t);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> R<()> {
        match self.memo.get(&idx) {
            Some(&id) => self.push_id(id),
            None => self.err(format!("memo entry {idx} was never stored")),
        }
    }

    fn global(&mut self, module: &str, name: &str) -> R<()> {
        if !is_known_global(module, name) {
            self.ignored.insert(format!("{module}.{name}"));
        }
        self.push(Node::Global {
            module: module.to_string(),
            name: name.to_string(),
        })
    }

    fn str_of(&self, id: Id) -> Option<&str> {
        match &self.nodes[id as usize] {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    fn callable_name(&self, id: Id) -> String {
        match &self.nodes[id as usize] {
            Node::Global { module, name } => format!("{module}.{name}"),
            Node::Opaque { callable, .. } => format!("<result of {callable}>"),
            _ => "<object>".to_string(),
        }
    }

    fn int_of(&self, id: Id) -> Option<i64> {
        match self.nodes[id as usize] {
            Node::Int(i) => Some(i),
            Node::Bool(b) => Some(b as i64),
            _ => None,
        }
    }

    fn seq_of(&self, id: Id) -> Option<&[Id]> {
        match &self.nodes[id as usize] {
            Node::Tuple(v) | Node::List(v) => Some(v),
            _ => None,
        }
    }

    fn usize_seq(&self, id: Id) -> Option<Vec<usize>> {
        self.seq_of(id)?
            .iter()
            .map(|&i| self.int_of(i).and_then(|v| usize::try_from(v).ok()))
            .collect()
    }

    fn rebuild_tensor(&mut self, args: &[Id]) -> R<Id> {
        let bad = |vm: &Self| {
            vm.err("_rebuild_tensor_v2 arguments are not (storage, offset, size tuple, stride tuple, ...)")
        };
        if args.len() < 4 {
            return bad(self);
        }
        let Node::Storage(storage) = &self.nodes[args[0] as usize] else {
            return bad(self);
        };
        let storage = storage.clone();
        let (Some(offset), Some(shape), Some(stride)) = (
            self.int_of(args[1]),
            self.usize_seq(args[2]),
            self.usize_seq(args[3]),
        ) else {
            return bad(self);
        };
        let Ok(offset) = u64::try_from(offset) else {
            return bad(self);
        };
        if shape.len() != stride.len() {
            return self.err(format!(
                "tensor size {shape:?} and stride {stride:?} have different lengths"
            ));
        }
        self.push_node(Node::Tensor(TensorRef {
            storage,
            offset,
            shape,
            stride,
        }))
    }

    /// REDUCE: performs the understood calls, returns a placeholder for everything else.
    fn apply(&mut self, func: Id, args: Id, depth: u32) -> R<Id> {
        let name = self.callable_name(func);
        let arg_list: Vec<Id> = self.seq_of(args).map(<[Id]>::to_vec).unwrap_or_default();
        match name.as_str() {
            "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
                return self.rebuild_tensor(&arg_list);
            }
            "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state"
                if !arg_list.is_empty() =>
            {
                return Ok(arg_list[0]);
            }
            // (func, new_type, args, state): the tensor is func(*args).
            "torch._tensor._rebuild_from_type_v2" if arg_list.len() >= 3 && depth < 4 => {
                return self.apply(arg_list[0], arg_list[2], depth + 1);
            }
            "collections.OrderedDict" => {
                let mut items = Vec::new();
                if let Some(&first) = arg_list.first()
                    && let Some(pairs) = self.seq_of(first)
                {
                    for &p in pairs {
                        if let Some(kv) = self.seq_of(p)
                            && kv.len() == 2
                        {
                            items.push((kv[0], kv[1]));
                        }
                    }
                }
                return self.push_node(Node::Dict(items));
            }
            "torch.Size" => {
                let items = arg_list
                    .first()
                    .and_then(|&a| self.seq_of(a))
                    .map(<[Id]>::to_vec)
                    .unwrap_or_default();
                return self.push_node(Node::Tuple(items));
            }
            _ => {}
        }
        if !self.calls.contains(&name) {
            self.calls.push(name.clone());
        }
        self.push_node(Node::Opaque {
            callable: name,
            args,
        })
    }

    fn new_object(&mut self, cls: Id, args: Id) -> R<()> {
        let name = self.callable_name(cls);
        if !self.objects.contains(&name) {
            self.objects.push(name.clone());
        }
        self.push(Node::Opaque {
            callable: name,
            args,
        })
    }

    fn persistent_load(&mut self, pid: Id) -> R<()> {
        let items = self.seq_of(pid).map(<[Id]>::to_vec).unwrap_or_default();
        // Legacy files add a sixth item, view metadata: None unless the storage is a view of
        // another one (not supported: such an id stays a placeholder).
        let plain = items.len() == 5
            || (items.len() == 6 && matches!(self.nodes[items[5] as usize], Node::None));
        if plain && self.str_of(items[0]) == Some("storage") {
            let type_name = match &self.nodes[items[1] as usize] {
                Node::Global { name, .. } => Some(name.clone()),
                _ => None,
            };
            let key = match &self.nodes[items[2] as usize] {
                Node::Str(s) => Some(s.clone()),
                Node::Int(i) => Some(i.to_string()),
                _ => None,
            };
            if let (Some(type_name), Some(key), Some(numel)) =
                (type_name, key, self.int_of(items[4]))
                && let Ok(numel) = u64::try_from(numel)
            {
                let dtype = Dtype::from_torch_storage(&type_name);
                return self.push(Node::Storage(StorageRef {
                    key,
                    dtype,
                    type_name,
                    numel,
                }));
            }
        }
        let name = "<persistent id>".to_string();
        if !self.calls.contains(&name) {
            self.calls.push(name.clone());
        }
        self.push(Node::Opaque {
            callable: name,
            args: pid,
        })
    }

    fn run(&mut self) -> R<Id> {
        loop {
            self.op_pos = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return self.err(format!("pickle protocol {proto} is newer than 5"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: length hint only
                }
                b'.' => return self.pop(),
                b'(' => {
                    if self.marks.len() >= self.limits.max_marks {
                        return self.err(format!(
                            "more than {} nested MARKs (limit)",
                            self.limits.max_marks
                        ));
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    let floor = self.marks.last().copied().unwrap_or(0);
                    if self.stack.len() > floor {
                        self.stack.pop();
                    } else if self.marks.pop().is_none() {
                        return self.err("POP on an empty stack");
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let t = self.top()?;
                    self.push_id(t)?;
                }
                b'N' => self.push(Node::None)?,
                0x88 => self.push(Node::Bool(true))?,
                0x89 => self.push(Node::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Node::Int(v as i64))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Node::Int(v as i64))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Node::Int(v as i64))?
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let b = self.take(n)?;
                    let node = if n <= 8 {
                        let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                            0xff
                        } else {
                            0
                        };
                        let mut buf = [fill; 8];
                        buf[..n].copy_from_slice(b);
                        Node::Int(i64::from_le_bytes(buf))
                    } else {
                        Node::BigInt(b.to_vec())
                    };
                    self.push(node)?
                }
                b'I' => {
                    let l = self.line()?;
                    let node = match l {
                        "00" => Node::Bool(false),
                        "01" => Node::Bool(true),
                        _ => match l.parse::<i64>() {
                            Ok(v) => Node::Int(v),
                            Err(_) => return self.err(format!("bad INT literal {l:?}")),
                        },
                    };
                    self.push(node)?
                }
                b'L' => {
                    let l = self.line()?;
                    let node = match l.trim_end_matches('L').parse::<i64>() {
                        Ok(v) => Node::Int(v),
                        Err(_) => Node::BigInt(Vec::new()),
                    };
                    self.push(node)?
                }
                b'G' => {
                    let b = self.take(8)?;
                    self.push(Node::Float(f64::from_be_bytes(
                        b.try_into().expect("8 bytes"),
                    )))?
                }
                b'F' => {
                    let l = self.line()?;
                    match l.parse::<f64>() {
                        Ok(v) => self.push(Node::Float(v))?,
                        Err(_) => return self.err(format!("bad FLOAT literal {l:?}")),
                    }
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as usize,
                        0x8c => self.u8()? as usize,
                        _ => self.len64()?,
                    };
                    let b = self.take(n)?;
                    match std::str::from_utf8(b) {
                        Ok(s) => self.push(Node::Str(s.to_string()))?,
                        Err(_) => return self.err("string is not valid UTF-8"),
                    }
                }
                b'V' => {
                    let l = self.line()?;
                    self.push(Node::Str(l.to_string()))?
                }
                b'S' => {
                    let l = self.line()?;
                    let s = l.trim().trim_matches(|c| c == '\'' || c == '"');
                    self.push(Node::Str(s.to_string()))?
                }
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        self.u32()? as usize
                    } else {
                        self.u8()? as usize
                    };
                    let b = self.take(n)?;
                    // Python 2 str: decoded as Latin-1, the loader's usual choice for tensors.
                    self.push(Node::Str(b.iter().map(|&c| c as char).collect()))?
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => self.u8()? as usize,
                        _ => self.len64()?,
                    };
                    let b = self.take(n)?;
                    self.push(Node::Bytes(b.to_vec()))?
                }
                b')' => self.push(Node::Tuple(Vec::new()))?,
                b']' => self.push(Node::List(Vec::new()))?,
                b'}' => self.push(Node::Dict(Vec::new()))?,
                0x8f => self.push(Node::Set(Vec::new()))?,
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut v = Vec::with_capacity(n);
                    for _ in 0..n {
                        v.push(self.pop()?);
                    }
                    v.reverse();
                    self.push(Node::Tuple(v))?
                }
                b't' => {
                    let v = self.pop_mark()?;
                    self.push(Node::Tuple(v))?
                }
                b'l' => {
                    let v = self.pop_mark()?;
                    self.push(Node::List(v))?
                }
                0x91 => {
                    let v = self.pop_mark()?;
                    self.push(Node::Set(v))?
                }
                b'd' => {
                    let v = self.pop_mark()?;
                    if v.len() % 2 != 0 {
                        return self.err("DICT with an odd number of items");
                    }
                    let pairs = v.chunks_exact(2).map(|c| (c[0], c[1])).collect();
                    self.push(Node::Dict(pairs))?
                }
                b'a' => {
                    let item = self.pop()?;
                    let target = self.top()?;
                    if let Node::List(l) = &mut self.nodes[target as usize] {
                        l.push(item);
                    }
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    match &mut self.nodes[target as usize] {
                        Node::List(l) | Node::Set(l) => l.extend(items),
                        _ => {} // appends to an opaque object: inert
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?;
                    if let Node::Dict(d) = &mut self.nodes[target as usize] {
                        d.push((k, v));
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.err("SETITEMS with an odd number of items");
                    }
                    let target = self.top()?;
                    if let Node::Dict(d) = &mut self.nodes[target as usize] {
                        d.extend(items.chunks_exact(2).map(|c| (c[0], c[1])));
                    }
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(m), Some(n)) = (self.str_of(module), self.str_of(name)) else {
                        return self.err("STACK_GLOBAL operands are not strings");
                    };
                    let (m, n) = (m.to_string(), n.to_string());
                    self.global(&m, &n)?
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let r = self.apply(func, args, 0)?;
                    self.push_id(r)?;
                }
                b'b' => {
                    // BUILD: the state is dropped; the object stays as it is (inert).
                    self.pop()?;
                    self.top()?;
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.new_object(cls, args)?
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.new_object(cls, args)?
                }
                b'o' => {
                    let items = self.pop_mark()?;
                    let Some((&cls, rest)) = items.split_first() else {
                        return self.err("OBJ without a class");
                    };
                    let args = self.push_node(Node::Tuple(rest.to_vec()))?;
                    self.new_object(cls, args)?
                }
                b'i' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    let items = self.pop_mark()?;
                    self.global(&module, &name)?;
                    let cls = self.pop()?;
                    let args = self.push_node(Node::Tuple(items))?;
                    self.new_object(cls, args)?
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.persistent_load(pid)?
                }
                b'P' => {
                    let l = self.line()?.to_string();
                    let pid = self.push_node(Node::Str(l))?;
                    self.persistent_load(pid)?
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?
                }
                b'p' => {
                    let l = self.line()?;
                    let Ok(i) = l.parse::<u32>() else {
                        return self.err(format!("bad PUT index {l:?}"));
                    };
                    self.memo_put(i)?
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?
                }
                b'g' => {
                    let l = self.line()?;
                    let Ok(i) = l.parse::<u32>() else {
                        return self.err(format!("bad GET index {l:?}"));
                    };
                    self.memo_get(i)?
                }
                0x82..=0x84 => {
                    return self.err("extension registry opcodes (EXT1/2/4) are not supported");
                }
                0x97 | 0x98 => {
                    return self.err("out-of-band buffers (protocol 5) are not supported");
                }
                _ => return self.err(format!("unknown opcode 0x{op:02x}")),
            }
        }
    }
}

impl Pickle {
    /// The node of `id`.
    pub fn node(&self, id: Id) -> &Node {
        &self.nodes[id as usize]
    }

    /// The string value of `id`, if it is a str.
    pub fn as_str(&self, id: Id) -> Option<&str> {
        match self.node(id) {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A short English description of `id` for messages ("a dict with keys ...", "an int").
    pub fn describe(&self, id: Id) -> String {
        match self.node(id) {
            Node::None => "None".into(),
            Node::Bool(b) => format!("the bool {}", if *b { "True" } else { "False" }),
            Node::Int(i) => format!("the integer {i}"),
            Node::BigInt(_) => "a large integer".into(),
            Node::Float(f) => format!("the float {f}"),
            Node::Str(_) => "a string".into(),
            Node::Bytes(b) => format!("{} bytes", b.len()),
            Node::Tuple(v) => format!("a tuple of {} items", v.len()),
            Node::List(v) => format!("a list of {} items", v.len()),
            Node::Set(v) => format!("a set of {} items", v.len()),
            Node::Dict(d) if d.is_empty() => "an empty dict".into(),
            Node::Dict(d) => {
                let keys: Vec<String> = d
                    .iter()
                    .take(5)
                    .map(|(k, _)| match self.as_str(*k) {
                        Some(s) => format!("\"{s}\""),
                        None => "<non-string key>".into(),
                    })
                    .collect();
                let more = if d.len() > 5 {
                    format!(" and {} more", d.len() - 5)
                } else {
                    String::new()
                };
                format!("a dict with keys {}{more}", keys.join(", "))
            }
            Node::Global { module, name } => format!("a reference to {module}.{name}"),
            Node::Storage(_) => "a bare storage".into(),
            Node::Tensor(_) => "a single tensor outside any dict".into(),
            Node::Opaque { callable, .. } => format!("an object made by {callable}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> R<Pickle> {
        load(bytes, Limits::default())
    }

    #[test]
    fn dict_of_ints_protocol2() {
        // pickle.dumps({"a": 1, "b": [2, 3]}, protocol=2)
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02]q\x03(K\x02K\x03eu.";
        let pk = run(p).expect("valid pickle");
        let Node::Dict(d) = pk.node(pk.root) else {
            panic!("root is not a dict")
        };
        assert_eq!(d.len(), 2);
        assert_eq!(pk.as_str(d[0].0), Some("a"));
        assert!(matches!(pk.node(d[0].1), Node::Int(1)));
        let Node::List(l) = pk.node(d[1].1) else {
            panic!("value is not a list")
        };
        assert_eq!(l.len(), 2);
        assert!(pk.calls.is_empty());
    }

    #[test]
    fn reduce_of_unknown_global_is_inert_and_recorded() {
        // pickle.dumps of a __reduce__ returning (os.system, ("echo hi",)), protocol 2
        let p = b"\x80\x02cposix\nsystem\nq\x00X\x07\x00\x00\x00echo hiq\x01\x85q\x02Rq\x03.";
        let pk = run(p).expect("valid pickle");
        assert_eq!(pk.calls, vec!["posix.system".to_string()]);
        assert!(pk.ignored_globals.contains("posix.system"));
        assert!(matches!(pk.node(pk.root), Node::Opaque { .. }));
    }

    #[test]
    fn malformed_streams_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"\x80",
            b"X\xff\xff\xff\xff",
            b"h\x05.",
            b"t.",
            b"(u.",
            b"\x82\x01",
            b"K",
        ] {
            assert!(run(bad).is_err(), "{bad:?} should fail");
        }
        let tiny = Limits {
            max_bytes: 3,
            ..Limits::default()
        };
        let err = load(b"\x80\x02N.\x00", tiny).unwrap_err();
        assert!(err.reason.contains("limit"), "{err:?}");
        // Trailing data after STOP is not read.
        let pk = load(b"\x80\x02N.\xff\xff", Limits::default()).expect("valid prefix");
        assert_eq!(pk.consumed, 4);
    }

    #[test]
    fn deep_nesting_drops_without_recursion() {
        // 200k lists pushed, then 200k-1 APPENDs each putting the top list into the one below:
        // nesting 200k deep, flat in the arena.
        let n = 200_000;
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', n));
        p.extend(std::iter::repeat_n(b'a', n - 1));
        p.push(b'.');
        let pk = run(&p).expect("valid pickle");
        assert_eq!(pk.nodes.len(), n);
    }
}

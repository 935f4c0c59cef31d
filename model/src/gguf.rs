//! GGUF reader: versions 2 and 3, every metadata value type, tensor infos and alignment.
//!
//! The file is memory-mapped and tensors are views into the map (no copy). The header parser
//! works on a byte slice and trusts nothing: every count, string length, array length, tensor
//! rank, shape and extent is checked against the bytes that are really there before anything
//! is allocated, so a truncated or hostile file yields a [`GgufError`] naming the problem,
//! never a panic and never a huge allocation. [`Header::parse`] is what the fuzz target drives.
//!
//! Layout (little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 metadata count,
//! metadata (string key, u32 type, value), tensor infos (string name, u32 rank, u64 dims,
//! u32 type, u64 offset), padding to `general.alignment` (default 32), then tensor data.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use shoal_kernels::GgmlType;

/// Default alignment of the data section and of each tensor, when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;
/// Nesting limit for arrays of arrays.
const MAX_ARRAY_DEPTH: usize = 4;

/// What is wrong with a GGUF byte stream.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GgufError {
    #[error("not a GGUF file (magic bytes {0:02x?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (shoal reads versions 2 and 3)")]
    UnsupportedVersion(u32),
    #[error("file is truncated: {what} needs {need} bytes at offset {offset}, file has {len}")]
    Truncated { what: String, offset: u64, need: u64, len: u64 },
    #[error(
        "file is truncated or corrupt: {what} claims {count} items, which cannot fit in the \
         {remaining} bytes left"
    )]
    ImplausibleCount { what: String, count: u64, remaining: u64 },
    #[error("{what}: invalid UTF-8 in string")]
    BadUtf8 { what: String },
    #[error("metadata key {key:?}: unknown value type {ty}")]
    UnknownValueType { key: String, ty: u32 },
    #[error("metadata key {key:?}: arrays nested deeper than {MAX_ARRAY_DEPTH}")]
    NestingTooDeep { key: String },
    #[error("duplicate metadata key {0:?}")]
    DuplicateKey(String),
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensor(String),
    #[error("general.alignment {0} is not a non-zero power of two")]
    BadAlignment(u64),
    #[error("tensor {name:?}: rank {rank} (at most {MAX_DIMS} allowed)")]
    BadRank { name: String, rank: u32 },
    #[error("tensor {name:?}: unknown ggml type id {id}")]
    UnknownTensorType { name: String, id: u32 },
    #[error("tensor {name:?}: shape {dims:?} is invalid for type {ty} ({why})")]
    BadShape { name: String, dims: Vec<u64>, ty: GgmlType, why: &'static str },
    #[error("tensor {name:?}: offset {offset} is not aligned to {alignment}")]
    MisalignedTensor { name: String, offset: u64, alignment: u64 },
    #[error(
        "file is truncated or corrupt: tensor {name:?} data [{start}, {end}) lies outside the \
         file's {len} bytes"
    )]
    TensorOutOfBounds { name: String, start: u64, end: u64, len: u64 },
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array. Arrays of numbers are kept as typed vectors (a 150k-entry score table is
/// 600 KB, not 150k enum values).
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as i64 when the array holds integers.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        Some(match self {
            Array::U8(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I8(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U16(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I16(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U32(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I32(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U64(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I64(v) => v.clone(),
            _ => return None,
        })
    }
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, when it is any number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64).or(match *self {
                Value::I8(v) => Some(v as f64),
                Value::I16(v) => Some(v as f64),
                Value::I32(v) => Some(v as f64),
                Value::I64(v) => Some(v as f64),
                _ => None,
            }),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::String(s) if s.len() > 60 => write!(f, "{:?}…", &s[..s.floor_char_boundary(60)]),
            Value::String(s) => write!(f, "{s:?}"),
            Value::Array(a) => write!(f, "[{} items]", a.len()),
            Value::F32(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            other => write!(f, "{}", other.as_f64().unwrap_or(0.0)),
        }
    }
}

/// Where a tensor is and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Size in bytes, computed from the type's block layout.
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header: metadata, tensor infos and where the data section starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                need: n,
                len: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Checks that `count` items of at least `min_size` bytes each can fit in what is left.
    fn plausible(&self, count: u64, min_size: u64, what: &dyn Fn() -> String) -> Result<(), GgufError> {
        if count.saturating_mul(min_size) > self.remaining() {
            return Err(GgufError::ImplausibleCount {
                what: what(),
                count,
                remaining: self.remaining(),
            });
        }
        Ok(())
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::BadUtf8 { what: what() })
    }
}

fn min_size_of(ty: u32) -> u64 {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,      // u64 length
        9 => 4 + 8,  // type + count
        _ => 8,
    }
}

fn read_scalars<const N: usize, T>(
    r: &mut Reader<'_>,
    count: u64,
    what: &dyn Fn() -> String,
    conv: fn([u8; N]) -> T,
) -> Result<Vec<T>, GgufError> {
    r.plausible(count, N as u64, what)?;
    let bytes = r.take(count * N as u64, what)?;
    Ok(bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            conv(a)
        })
        .collect())
}

fn read_array(r: &mut Reader<'_>, key: &str, depth: usize) -> Result<Array, GgufError> {
    let what = || format!("metadata key {key:?} array");
    if depth > MAX_ARRAY_DEPTH {
        return Err(GgufError::NestingTooDeep { key: key.to_string() });
    }
    let ty = r.u32(&what)?;
    let count = r.u64(&what)?;
    r.plausible(count, min_size_of(ty), &what)?;
    Ok(match ty {
        0 => Array::U8(read_scalars(r, count, &what, u8::from_le_bytes)?),
        1 => Array::I8(read_scalars(r, count, &what, i8::from_le_bytes)?),
        2 => Array::U16(read_scalars(r, count, &what, u16::from_le_bytes)?),
        3 => Array::I16(read_scalars(r, count, &what, i16::from_le_bytes)?),
        4 => Array::U32(read_scalars(r, count, &what, u32::from_le_bytes)?),
        5 => Array::I32(read_scalars(r, count, &what, i32::from_le_bytes)?),
        6 => Array::F32(read_scalars(r, count, &what, f32::from_le_bytes)?),
        7 => Array::Bool(read_scalars(r, count, &what, |b: [u8; 1]| b[0] != 0)?),
        8 => {
            let mut v = Vec::with_capacity(count as usize);
            for _ in 0..count {
                v.push(r.string(&what)?);
            }
            Array::String(v)
        }
        9 => {
            let mut v = Vec::with_capacity(count as usize);
            for _ in 0..count {
                v.push(read_array(r, key, depth + 1)?);
            }
            Array::Array(v)
        }
        10 => Array::U64(read_scalars(r, count, &what, u64::from_le_bytes)?),
        11 => Array::I64(read_scalars(r, count, &what, i64::from_le_bytes)?),
        12 => Array::F64(read_scalars(r, count, &what, f64::from_le_bytes)?),
        other => return Err(GgufError::UnknownValueType { key: key.to_string(), ty: other }),
    })
}

fn read_value(r: &mut Reader<'_>, key: &str, ty: u32) -> Result<Value, GgufError> {
    let what = || format!("metadata key {key:?}");
    Ok(match ty {
        0 => Value::U8(u8::from_le_bytes(r.array(&what)?)),
        1 => Value::I8(i8::from_le_bytes(r.array(&what)?)),
        2 => Value::U16(u16::from_le_bytes(r.array(&what)?)),
        3 => Value::I16(i16::from_le_bytes(r.array(&what)?)),
        4 => Value::U32(u32::from_le_bytes(r.array(&what)?)),
        5 => Value::I32(i32::from_le_bytes(r.array(&what)?)),
        6 => Value::F32(f32::from_le_bytes(r.array(&what)?)),
        7 => Value::Bool(r.array::<1>(&what)?[0] != 0),
        8 => Value::String(r.string(&what)?),
        9 => Value::Array(read_array(r, key, 0)?),
        10 => Value::U64(u64::from_le_bytes(r.array(&what)?)),
        11 => Value::I64(i64::from_le_bytes(r.array(&what)?)),
        12 => Value::F64(f64::from_le_bytes(r.array(&what)?)),
        other => return Err(GgufError::UnknownValueType { key: key.to_string(), ty: other }),
    })
}

impl Header {
    /// Parses a GGUF header from `buf`. When `require_data` is true, every tensor's bytes must
    /// lie inside `buf`; when false (planning from a header-only prefix of a file), only the
    /// header itself must be complete.
    pub fn parse(buf: &[u8], require_data: bool) -> Result<Header, GgufError> {
        let mut r = Reader { buf, pos: 0 };
        let magic: [u8; 4] = r.array(&|| "magic".to_string())?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic(magic));
        }
        let version = r.u32(&|| "version".to_string())?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = r.u64(&|| "tensor count".to_string())?;
        let n_kv = r.u64(&|| "metadata count".to_string())?;
        // A key/value pair takes at least 8 (key length) + 4 (type) + 1 bytes.
        r.plausible(n_kv, 13, &|| "metadata count".to_string())?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&|| format!("metadata key #{i}"))?;
            let ty = r.u32(&|| format!("type of metadata key {key:?}"))?;
            let value = read_value(&mut r, &key, ty)?;
            if metadata.contains_key(&key) {
                return Err(GgufError::DuplicateKey(key));
            }
            metadata.insert(key, value);
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => {
                let a = v.as_u64().unwrap_or(0);
                if a == 0 || !a.is_power_of_two() {
                    return Err(GgufError::BadAlignment(a));
                }
                a
            }
        };

        // A tensor info takes at least 8 (name length) + 4 (rank) + 4 (type) + 8 (offset).
        r.plausible(n_tensors, 24, &|| "tensor count".to_string())?;
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut names = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = r.string(&|| format!("tensor #{i} name"))?;
            let what = || format!("tensor {name:?} info");
            let rank = r.u32(&what)?;
            if rank as usize > MAX_DIMS {
                return Err(GgufError::BadRank { name, rank });
            }
            let mut dims = Vec::with_capacity(rank as usize);
            for _ in 0..rank {
                dims.push(r.u64(&what)?);
            }
            let id = r.u32(&what)?;
            let ty = GgmlType::from_id(id)
                .map_err(|_| GgufError::UnknownTensorType { name: name.clone(), id })?;
            let offset = r.u64(&what)?;
            let bad = |why| GgufError::BadShape { name: name.clone(), dims: dims.clone(), ty, why };
            let n_el = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad("element count overflows"))?;
            if dims.first().is_some_and(|&d0| d0 % ty.block_size() as u64 != 0) {
                return Err(bad("row length is not a multiple of the block size"));
            }
            let size = ty.bytes_for(n_el).ok_or_else(|| bad("size overflows"))?;
            if offset % alignment != 0 {
                return Err(GgufError::MisalignedTensor { name, offset, alignment });
            }
            if !names.insert(name.clone()) {
                return Err(GgufError::DuplicateTensor(name));
            }
            tensors.push(TensorInfo { name, dims, ty, offset, size });
        }

        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        let len = buf.len() as u64;
        for t in &tensors {
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.size));
            match (start, end) {
                (Some(_), Some(end)) if !require_data || end <= len => {}
                (start, end) => {
                    return Err(GgufError::TensorOutOfBounds {
                        name: t.name.clone(),
                        start: start.unwrap_or(u64::MAX),
                        end: end.unwrap_or(u64::MAX),
                        len,
                    });
                }
            }
        }
        Ok(Header { version, metadata, tensors, alignment, data_offset })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// Total bytes of tensor data.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.size).sum()
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    header: Header,
    by_name: std::collections::HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.header.version)
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and validates `path`. Tensor data stays on disk until touched.
    pub fn open(path: impl AsRef<Path>) -> crate::Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path)
            .map_err(|error| crate::Error::Io { path: path.clone(), error })?;
        let meta = file.metadata().map_err(|error| crate::Error::Io { path: path.clone(), error })?;
        if meta.is_dir() {
            return Err(crate::Error::Io {
                path,
                error: std::io::Error::other("is a directory, not a model file"),
            });
        }
        // SAFETY: the map is read-only; a file truncated underneath us by another process
        // would fault, as with every mmap-based loader. We never write through it.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|error| crate::Error::Io { path: path.clone(), error })?;
        let header = Header::parse(&map, true)
            .map_err(|error| crate::Error::Gguf { path: path.clone(), error })?;
        let by_name = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile { path, map, header, by_name })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    pub fn file_size(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.header.metadata.get(key)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.header.tensors[i])
    }

    /// The bytes of a tensor, a view into the map. Extents were checked at open.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.header.data_offset + t.offset) as usize;
        &self.map[start..start + t.size as usize]
    }

    /// Asks the OS to read a tensor range ahead (used while loading a shard).
    pub fn advise_willneed(&self) {
        #[cfg(unix)]
        let _ = self.map.advise(memmap2::Advice::WillNeed);
    }

    // Typed metadata accessors. A missing key is `Ok(None)`; a key of the wrong type is an
    // error naming the key.

    fn wrong(&self, key: &str, want: &'static str, v: &Value) -> crate::Error {
        crate::Error::Metadata {
            key: key.to_string(),
            msg: format!("expected {want}, found {}", v.type_name()),
        }
    }

    pub fn get_u64(&self, key: &str) -> crate::Result<Option<u64>> {
        self.get(key).map(|v| v.as_u64().ok_or_else(|| self.wrong(key, "an unsigned integer", v))).transpose()
    }

    pub fn get_f32(&self, key: &str) -> crate::Result<Option<f32>> {
        self.get(key).map(|v| v.as_f64().map(|x| x as f32).ok_or_else(|| self.wrong(key, "a number", v))).transpose()
    }

    pub fn get_str(&self, key: &str) -> crate::Result<Option<&str>> {
        self.get(key).map(|v| v.as_str().ok_or_else(|| self.wrong(key, "a string", v))).transpose()
    }

    pub fn get_bool(&self, key: &str) -> crate::Result<Option<bool>> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| self.wrong(key, "a bool", v))).transpose()
    }

    pub fn get_array(&self, key: &str) -> crate::Result<Option<&Array>> {
        self.get(key).map(|v| v.as_array().ok_or_else(|| self.wrong(key, "an array", v))).transpose()
    }

    /// A required unsigned integer.
    pub fn require_u64(&self, key: &str) -> crate::Result<u64> {
        self.get_u64(key)?.ok_or_else(|| crate::Error::MissingMetadata(key.to_string()))
    }

    /// A required string.
    pub fn require_str(&self, key: &str) -> crate::Result<&str> {
        self.get_str(key)?.ok_or_else(|| crate::Error::MissingMetadata(key.to_string()))
    }
}

/// Builds GGUF bytes in memory: used by tests and by tools that write small files.
#[derive(Default, Debug)]
pub struct Builder {
    kv: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
    pub version: u32,
}

impl Builder {
    pub fn new() -> Self {
        Builder { version: 3, ..Default::default() }
    }

    pub fn kv(mut self, key: &str, v: Value) -> Self {
        self.kv.push((key.to_string(), v));
        self
    }

    pub fn tensor(mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> Self {
        self.tensors.push((name.to_string(), dims.to_vec(), ty, data));
        self
    }

    pub fn build(&self) -> Vec<u8> {
        fn put_str(o: &mut Vec<u8>, s: &str) {
            o.extend((s.len() as u64).to_le_bytes());
            o.extend(s.as_bytes());
        }
        fn type_id(v: &Value) -> u32 {
            match v {
                Value::U8(_) => 0,
                Value::I8(_) => 1,
                Value::U16(_) => 2,
                Value::I16(_) => 3,
                Value::U32(_) => 4,
                Value::I32(_) => 5,
                Value::F32(_) => 6,
                Value::Bool(_) => 7,
                Value::String(_) => 8,
                Value::Array(_) => 9,
                Value::U64(_) => 10,
                Value::I64(_) => 11,
                Value::F64(_) => 12,
            }
        }
        fn put_array(o: &mut Vec<u8>, a: &Array) {
            macro_rules! nums {
                ($ty:expr, $v:expr) => {{
                    o.extend(($ty as u32).to_le_bytes());
                    o.extend(($v.len() as u64).to_le_bytes());
                    for x in $v {
                        o.extend(x.to_le_bytes());
                    }
                }};
            }
            match a {
                Array::U8(v) => nums!(0, v),
                Array::I8(v) => nums!(1, v),
                Array::U16(v) => nums!(2, v),
                Array::I16(v) => nums!(3, v),
                Array::U32(v) => nums!(4, v),
                Array::I32(v) => nums!(5, v),
                Array::F32(v) => nums!(6, v),
                Array::Bool(v) => nums!(7, v.iter().map(|&b| b as u8).collect::<Vec<_>>()),
                Array::String(v) => {
                    o.extend(8u32.to_le_bytes());
                    o.extend((v.len() as u64).to_le_bytes());
                    for s in v {
                        put_str(o, s);
                    }
                }
                Array::Array(v) => {
                    o.extend(9u32.to_le_bytes());
                    o.extend((v.len() as u64).to_le_bytes());
                    for x in v {
                        put_array(o, x);
                    }
                }
                Array::U64(v) => nums!(10, v),
                Array::I64(v) => nums!(11, v),
                Array::F64(v) => nums!(12, v),
            }
        }
        let mut o = Vec::new();
        o.extend(b"GGUF");
        o.extend(self.version.to_le_bytes());
        o.extend((self.tensors.len() as u64).to_le_bytes());
        o.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut o, k);
            o.extend(type_id(v).to_le_bytes());
            match v {
                Value::U8(x) => o.extend(x.to_le_bytes()),
                Value::I8(x) => o.extend(x.to_le_bytes()),
                Value::U16(x) => o.extend(x.to_le_bytes()),
                Value::I16(x) => o.extend(x.to_le_bytes()),
                Value::U32(x) => o.extend(x.to_le_bytes()),
                Value::I32(x) => o.extend(x.to_le_bytes()),
                Value::F32(x) => o.extend(x.to_le_bytes()),
                Value::Bool(x) => o.push(*x as u8),
                Value::String(s) => put_str(&mut o, s),
                Value::Array(a) => put_array(&mut o, a),
                Value::U64(x) => o.extend(x.to_le_bytes()),
                Value::I64(x) => o.extend(x.to_le_bytes()),
                Value::F64(x) => o.extend(x.to_le_bytes()),
            }
        }
        let align = DEFAULT_ALIGNMENT as usize;
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut o, name);
            o.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                o.extend(d.to_le_bytes());
            }
            o.extend(ty.id().to_le_bytes());
            o.extend((offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len()).div_ceil(align) * align;
        }
        o.resize(o.len().div_ceil(align) * align, 0);
        let base = o.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            o.resize(base + off, 0);
            o.extend(data);
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Builder {
        Builder::new()
            .kv("general.architecture", Value::String("llama".into()))
            .kv("llama.block_count", Value::U32(2))
            .kv("f", Value::F64(1.5))
            .kv("b", Value::Bool(true))
            .kv("i8", Value::I8(-3))
            .kv("toks", Value::Array(Array::String(vec!["a".into(), "é".into()])))
            .kv("scores", Value::Array(Array::F32(vec![0.5, -1.0])))
            .kv("nested", Value::Array(Array::Array(vec![Array::U16(vec![1, 2]), Array::I64(vec![-7])])))
            .tensor("w", &[4, 2], GgmlType::F32, vec![0u8; 32])
            .tensor("q", &[32, 1], GgmlType::Q8_0, vec![1u8; 34])
    }

    #[test]
    fn round_trips_every_value_type() {
        let bytes = sample().build();
        let h = Header::parse(&bytes, true).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.get("llama.block_count").unwrap().as_u64(), Some(2));
        assert_eq!(h.get("i8"), Some(&Value::I8(-3)));
        assert_eq!(h.get("f").unwrap().as_f64(), Some(1.5));
        assert_eq!(
            h.get("nested"),
            Some(&Value::Array(Array::Array(vec![Array::U16(vec![1, 2]), Array::I64(vec![-7])])))
        );
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors[1].offset, 32);
        assert_eq!(h.tensors[1].size, 34);
        assert_eq!(h.data_offset % 32, 0);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample().build();
        for n in 0..bytes.len() {
            let r = Header::parse(&bytes[..n], true);
            assert!(r.is_err(), "prefix of {n} bytes parsed");
        }
    }

    #[test]
    fn header_only_prefix_is_enough_for_planning() {
        let bytes = sample().build();
        let h = Header::parse(&bytes, true).unwrap();
        let cut = &bytes[..h.data_offset as usize];
        assert!(Header::parse(cut, true).is_err());
        assert_eq!(Header::parse(cut, false).unwrap().tensors, h.tensors);
    }

    #[test]
    fn hostile_counts_are_refused_before_allocating() {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(0u64.to_le_bytes());
        bytes.extend(u64::MAX.to_le_bytes());
        assert!(matches!(Header::parse(&bytes, true), Err(GgufError::ImplausibleCount { .. })));

        // A string array claiming 2^60 entries.
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.push(b'k');
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend((1u64 << 60).to_le_bytes());
        assert!(matches!(Header::parse(&b, true), Err(GgufError::ImplausibleCount { .. })));
    }

    #[test]
    fn bad_magic_version_and_types_are_named() {
        assert_eq!(Header::parse(b"GGML\x03\0\0\0", true), Err(GgufError::BadMagic(*b"GGML")));
        let mut b = sample().build();
        b[4] = 1;
        assert_eq!(Header::parse(&b, true), Err(GgufError::UnsupportedVersion(1)));

        // Unknown tensor type id: patch the type of the first tensor to 77.
        let good = sample().build();
        let h = Header::parse(&good, true).unwrap();
        let _ = h;
        let needle = {
            let mut n = (1u64).to_le_bytes().to_vec(); // name length of "w"
            n.push(b'w');
            n
        };
        let at = good.windows(needle.len()).position(|w| w == needle.as_slice()).unwrap();
        let ty_at = at + needle.len() + 4 + 16;
        let mut b = good.clone();
        b[ty_at..ty_at + 4].copy_from_slice(&77u32.to_le_bytes());
        assert_eq!(
            Header::parse(&b, true),
            Err(GgufError::UnknownTensorType { name: "w".into(), id: 77 })
        );
    }

    #[test]
    fn misaligned_and_out_of_bounds_tensors_are_refused() {
        let good = sample().build();
        let needle = {
            let mut n = (1u64).to_le_bytes().to_vec();
            n.push(b'q');
            n
        };
        let at = good.windows(needle.len()).position(|w| w == needle.as_slice()).unwrap();
        let off_at = at + needle.len() + 4 + 16 + 4;
        let mut b = good.clone();
        b[off_at..off_at + 8].copy_from_slice(&33u64.to_le_bytes());
        assert!(matches!(Header::parse(&b, true), Err(GgufError::MisalignedTensor { .. })));
        b[off_at..off_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(Header::parse(&b, true), Err(GgufError::TensorOutOfBounds { .. })));
        b[off_at..off_at + 8].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
        assert!(matches!(Header::parse(&b, true), Err(GgufError::TensorOutOfBounds { .. })));
    }
}

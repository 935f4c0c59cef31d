//! Byte-level BPE (`tokenizer.ggml.model == "gpt2"`), as llama.cpp's `llm_tokenizer_bpe_session`.
//!
//! Each pre-tokenized word is byte-encoded (GPT-2 alphabet), split into one symbol per byte,
//! and adjacent pairs merge lowest rank first (ties: leftmost), until no pair has a rank.
//!
//! Key decision: merges are keyed by interned symbol ids, not strings. Every text that occurs
//! on either side of a merge gets an id (its token id when it is a token, else an id past the
//! vocab), and each merge stores the id of its result, so merging allocates nothing. A merge
//! result that is on no merge's side can never merge again, which the `NONE` id expresses.
//! A final symbol that is not a token falls back, as in llama.cpp, to looking up each of its
//! encoded bytes as a one-character token.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::pretok::PreTokenizer;
use super::unicode::{byte_encode_into, byte_to_char};

const NONE: u32 = u32::MAX;

pub(crate) struct Bpe {
    /// (left id, right id) -> (rank, result id).
    ranks: HashMap<(u32, u32), (u32, u32)>,
    /// Interned id of each byte's one-character symbol.
    byte_sym: [u32; 256],
    n_vocab: u32,
    pre: PreTokenizer,
    ignore_merges: bool,
}

#[derive(Clone, Copy)]
struct Sym {
    start: u32,
    len: u32,
    id: u32,
    prev: i32,
    next: i32,
}

impl Bpe {
    /// `merges` are "left right" strings in rank order; a line without a space after its first
    /// byte is kept as an empty pair, as llama.cpp does, and so never matches.
    pub(crate) fn new(
        token_to_id: &HashMap<String, u32>,
        n_vocab: u32,
        merges: &[String],
        pre: PreTokenizer,
        ignore_merges: bool,
    ) -> Bpe {
        // Texts on a side of some merge that are not tokens, with ids past the vocab.
        let mut extra: HashMap<&str, u32> = HashMap::new();
        let mut pairs = Vec::with_capacity(merges.len());
        for m in merges {
            // llama.cpp: word.find(' ', 1).
            let split = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1);
            let (l, r) = match split {
                Some(p) => (&m[..p], &m[p + 1..]),
                None => ("", ""),
            };
            let mut ids = [0u32; 2];
            for (k, side) in [l, r].into_iter().enumerate() {
                ids[k] = match token_to_id.get(side) {
                    Some(&id) => id,
                    None => {
                        let next = n_vocab + extra.len() as u32;
                        *extra.entry(side).or_insert(next)
                    }
                };
            }
            pairs.push((l, r, ids[0], ids[1]));
        }
        let lookup = |s: &str| token_to_id.get(s).or_else(|| extra.get(s)).copied().unwrap_or(NONE);
        let mut ranks = HashMap::with_capacity(pairs.len());
        let mut joined = String::new();
        for (rank, &(l, r, li, ri)) in pairs.iter().enumerate() {
            joined.clear();
            joined.push_str(l);
            joined.push_str(r);
            // First occurrence wins (std::unordered_map::emplace).
            ranks.entry((li, ri)).or_insert((rank as u32, lookup(&joined)));
        }
        let byte_sym = std::array::from_fn(|b| lookup(byte_to_char(b as u8).encode_utf8(&mut [0; 4])));
        Bpe { ranks, byte_sym, n_vocab, pre, ignore_merges }
    }

    /// Tokenizes one raw-text fragment (no special tokens in it), appending ids to `out`.
    pub(crate) fn encode(
        &self,
        text: &str,
        token_to_id: &HashMap<String, u32>,
        out: &mut Vec<u32>,
    ) -> Result<(), String> {
        let mut enc = String::new();
        let mut syms = Vec::new();
        let mut heap = BinaryHeap::new();
        for word in self.pre.split(text)? {
            if self.ignore_merges {
                enc.clear();
                byte_encode_into(word.as_bytes(), &mut enc);
                if let Some(&id) = token_to_id.get(enc.as_str()) {
                    out.push(id);
                    continue;
                }
            }
            self.encode_word(word.as_bytes(), token_to_id, &mut syms, &mut heap, &mut enc, out);
        }
        Ok(())
    }

    fn encode_word(
        &self,
        word: &[u8],
        token_to_id: &HashMap<String, u32>,
        syms: &mut Vec<Sym>,
        heap: &mut BinaryHeap<Reverse<(u32, u32, u32)>>,
        enc: &mut String,
        out: &mut Vec<u32>,
    ) {
        let n = word.len();
        syms.clear();
        heap.clear();
        syms.extend(word.iter().enumerate().map(|(i, &b)| Sym {
            start: i as u32,
            len: 1,
            id: self.byte_sym[b as usize],
            prev: i as i32 - 1,
            next: if i + 1 == n { -1 } else { i as i32 + 1 },
        }));
        // Heap entries: (rank, left index, size in bytes); smallest rank, then leftmost, first.
        let push = |syms: &[Sym], heap: &mut BinaryHeap<Reverse<(u32, u32, u32)>>, l: i32, r: i32| {
            if l < 0 || r < 0 {
                return;
            }
            let (a, b) = (syms[l as usize], syms[r as usize]);
            if let Some(&(rank, _)) = self.ranks.get(&(a.id, b.id)) {
                heap.push(Reverse((rank, l as u32, a.len + b.len)));
            }
        };
        for i in 1..n {
            push(syms, heap, i as i32 - 1, i as i32);
        }
        while let Some(Reverse((_, l, size))) = heap.pop() {
            let l = l as usize;
            let r = syms[l].next;
            if r < 0 {
                continue;
            }
            let r = r as usize;
            // A stale entry: one side was merged away or grew since it was pushed.
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != size {
                continue;
            }
            let Some(&(_, result)) = self.ranks.get(&(syms[l].id, syms[r].id)) else { continue };
            syms[l].len += syms[r].len;
            syms[l].id = result;
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if syms[r].next >= 0 {
                let nx = syms[r].next as usize;
                syms[nx].prev = l as i32;
            }
            push(syms, heap, syms[l].prev, l as i32);
            push(syms, heap, l as i32, syms[l].next);
        }
        for s in syms.iter().filter(|s| s.len > 0) {
            if s.id < self.n_vocab {
                out.push(s.id);
                continue;
            }
            // Not a token: llama.cpp looks up each byte of the encoded text on its own.
            enc.clear();
            byte_encode_into(&word[s.start as usize..(s.start + s.len) as usize], enc);
            for b in enc.bytes().filter(u8::is_ascii) {
                if let Some(&id) = token_to_id.get((b as char).encode_utf8(&mut [0; 4]) as &str) {
                    out.push(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_lowest_rank_first_and_falls_back_per_byte() {
        let vocab = ["a", "b", "c", "ab", "bc", "abc", "Ġ"];
        let t2i: HashMap<String, u32> = vocab.iter().enumerate().map(|(i, s)| (s.to_string(), i as u32)).collect();
        // "b c" outranks "a b", so "abc" becomes a + bc, then "a bc" -> abc.
        let merges = ["b c", "a b", "a bc"].map(String::from);
        let pre = PreTokenizer::new(&[r"\s+|\S+"]).unwrap();
        let bpe = Bpe::new(&t2i, vocab.len() as u32, &merges, pre, false);
        let mut out = Vec::new();
        bpe.encode("abc ab", &t2i, &mut out).unwrap();
        assert_eq!(out, [5, 6, 3]);
        // "d" is no token and no merge: its fallback finds nothing.
        out.clear();
        bpe.encode("dab", &t2i, &mut out).unwrap();
        assert_eq!(out, [3]);
    }
}

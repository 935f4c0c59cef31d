//! SentencePiece BPE (`tokenizer.ggml.model == "llama"`), as llama.cpp's `llm_tokenizer_spm`.
//!
//! The caller has already replaced spaces with `▁` (and added the prefix space). The text is
//! split into UTF-8 characters; adjacent pairs whose concatenation is a token merge, highest
//! score first (ties: leftmost). A final piece that is not a token is emitted as its bytes'
//! `<0xXX>` tokens.
//!
//! llama.cpp's `resegment` also consults a map of reverse merges; it can never fire, because
//! only pairs whose concatenation is a token are ever merged, so every multi-character piece
//! is a token. It is left out.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};

#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    len: usize,
    prev: isize,
    next: isize,
}

struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Greater = popped first: higher score, then smaller left index.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score.total_cmp(&o.score).then(Reverse(self.left).cmp(&Reverse(o.left)))
    }
}

/// Tokenizes `text` (spaces already escaped), appending ids to `out`. `byte_tokens[b]` is the
/// token for byte `b`, if the vocab has one.
pub(crate) fn encode(
    text: &str,
    token_to_id: &HashMap<String, u32>,
    scores: &[f32],
    byte_tokens: &[Option<u32>; 256],
    out: &mut Vec<u32>,
) -> Result<(), String> {
    let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
    let n_chars = text.chars().count();
    for (i, (start, c)) in text.char_indices().enumerate() {
        syms.push(Sym {
            start,
            len: c.len_utf8(),
            prev: i as isize - 1,
            next: if i + 1 == n_chars { -1 } else { i as isize + 1 },
        });
    }
    let mut heap = BinaryHeap::new();
    let try_add = |syms: &[Sym], heap: &mut BinaryHeap<Bigram>, l: isize, r: isize| {
        if l < 0 || r < 0 {
            return;
        }
        let (a, b) = (syms[l as usize], syms[r as usize]);
        let piece = &text[a.start..b.start + b.len];
        if let Some(&id) = token_to_id.get(piece) {
            let score = scores.get(id as usize).copied().unwrap_or(0.0);
            heap.push(Bigram { score, left: l as usize, right: r as usize, size: piece.len() });
        }
    };
    for i in 1..syms.len() {
        try_add(&syms, &mut heap, i as isize - 1, i as isize);
    }
    while let Some(bg) = heap.pop() {
        let (l, r) = (syms[bg.left], syms[bg.right]);
        if l.len == 0 || r.len == 0 || l.len + r.len != bg.size {
            continue;
        }
        syms[bg.left].len += r.len;
        syms[bg.right].len = 0;
        syms[bg.left].next = r.next;
        if r.next >= 0 {
            syms[r.next as usize].prev = bg.left as isize;
        }
        try_add(&syms, &mut heap, syms[bg.left].prev, bg.left as isize);
        try_add(&syms, &mut heap, bg.left as isize, syms[bg.left].next);
    }
    if syms.is_empty() {
        return Ok(());
    }
    let mut i = 0isize;
    while i != -1 {
        let s = syms[i as usize];
        let piece = &text[s.start..s.start + s.len];
        match token_to_id.get(piece) {
            Some(&id) => out.push(id),
            None => {
                for &b in piece.as_bytes() {
                    let id = byte_tokens[b as usize]
                        .ok_or_else(|| format!("no token for byte 0x{b:02X} (the vocab lacks <0x{b:02X}>)"))?;
                    out.push(id);
                }
            }
        }
        i = s.next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let vocab = ["▁", "a", "b", "ab", "▁ab", "<0x63>"];
        let t2i: HashMap<String, u32> = vocab.iter().enumerate().map(|(i, s)| (s.to_string(), i as u32)).collect();
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, 0.0];
        let mut bytes = [None; 256];
        bytes[b'c' as usize] = Some(5);
        let mut out = Vec::new();
        encode("▁abc", &t2i, &scores, &bytes, &mut out).unwrap();
        assert_eq!(out, [4, 5]);
    }
}

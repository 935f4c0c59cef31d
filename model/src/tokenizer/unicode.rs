//! Codepoint classification and the GPT-2 byte-level alphabet, as llama.cpp's `unicode.cpp`.
//!
//! Categories come from a table generated from llama.cpp's own data (`unicode_table.rs`), not
//! from Rust's Unicode tables: a pre-tokenizer that disagrees with llama.cpp about one
//! codepoint's category splits words differently and yields different token ids. Unassigned
//! codepoints are `UNDEFINED`, as in llama.cpp.

use std::sync::OnceLock;

use super::unicode_table::{RANGES, WHITESPACE as WHITESPACE_CPTS};

pub(crate) const UNDEFINED: u16 = 0x0001;
pub(crate) const NUMBER: u16 = 0x0002;
pub(crate) const LETTER: u16 = 0x0004;
pub(crate) const ACCENT_MARK: u16 = 0x0010;
pub(crate) const PUNCTUATION: u16 = 0x0020;
pub(crate) const SYMBOL: u16 = 0x0040;
/// The eight category bits; exactly one is set for every codepoint.
pub(crate) const MASK_CATEGORIES: u16 = 0x00FF;
pub(crate) const WHITESPACE: u16 = 0x0100;

fn lookup(cpt: u32) -> u16 {
    if cpt >= 0x110000 {
        return UNDEFINED;
    }
    // RANGES[0].0 == 0, so the partition point is at least 1.
    let i = RANGES.partition_point(|&(start, _)| start <= cpt) - 1;
    let mut flags = RANGES[i].1 as u16;
    if WHITESPACE_CPTS.binary_search(&cpt).is_ok() {
        flags |= WHITESPACE;
    }
    flags
}

/// Category bits (plus [`WHITESPACE`]) of a codepoint; never 0.
pub(crate) fn flags(cpt: u32) -> u16 {
    static LATIN1: OnceLock<[u16; 256]> = OnceLock::new();
    if cpt < 256 {
        let table = LATIN1.get_or_init(|| std::array::from_fn(|c| lookup(c as u32)));
        return table[cpt as usize];
    }
    lookup(cpt)
}

const fn build_byte_to_cpt() -> [u32; 256] {
    let mut map = [0u32; 256];
    let mut n = 0;
    let mut b = 0;
    while b < 256 {
        let printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        map[b] = if printable {
            b as u32
        } else {
            n += 1;
            256 + n - 1
        };
        b += 1;
    }
    map
}

/// GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the other 68 to U+0100….
const BYTE_TO_CPT: [u32; 256] = build_byte_to_cpt();

/// Codepoints of the byte-level alphabet are all below this.
const ALPHABET_END: usize = 0x144;

const fn build_cpt_to_byte() -> [i16; ALPHABET_END] {
    let mut map = [-1i16; ALPHABET_END];
    let mut b = 0;
    while b < 256 {
        map[BYTE_TO_CPT[b] as usize] = b as i16;
        b += 1;
    }
    map
}

const CPT_TO_BYTE: [i16; ALPHABET_END] = build_cpt_to_byte();

/// The byte-level alphabet character that stands for `byte`.
pub(crate) fn byte_to_char(byte: u8) -> char {
    // Every value in BYTE_TO_CPT is below 0x144, a valid scalar value.
    char::from_u32(BYTE_TO_CPT[byte as usize]).unwrap_or('\u{FFFD}')
}

/// Appends the byte-level encoding of `bytes` to `out`.
pub(crate) fn byte_encode_into(bytes: &[u8], out: &mut String) {
    out.extend(bytes.iter().map(|&b| byte_to_char(b)));
}

/// The byte a byte-level alphabet character stands for.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let i = c as usize;
    (i < ALPHABET_END && CPT_TO_BYTE[i] >= 0).then(|| CPT_TO_BYTE[i] as u8)
}

/// llama.cpp's `llama_decode_text`: maps a byte-level token text back to bytes. A character
/// outside the alphabet renders as `[UNK_BYTE_0x<hex of its UTF-8><whole text>]`, verbatim.
pub(crate) fn byte_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_round_trips_and_matches_gpt2() {
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(byte_to_char(0xAD), '\u{143}');
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(byte_to_char(b)), Some(b));
        }
        assert_eq!(byte_decode("ĠHello"), b" Hello");
    }

    #[test]
    fn categories_match_llama_cpp() {
        assert_eq!(flags('a' as u32), LETTER);
        assert_eq!(flags('7' as u32), NUMBER);
        assert_eq!(flags(' ' as u32) & WHITESPACE, WHITESPACE);
        assert_eq!(flags('\n' as u32) & WHITESPACE, WHITESPACE);
        assert_eq!(flags('!' as u32), PUNCTUATION);
        assert_eq!(flags('$' as u32), SYMBOL);
        assert_eq!(flags('é' as u32), LETTER);
        assert_eq!(flags('½' as u32), NUMBER);
        assert_eq!(flags(0x3000) & WHITESPACE, WHITESPACE);
        assert_eq!(flags(0x0301), ACCENT_MARK);
        assert_eq!(flags(0x10FFFF), UNDEFINED);
        assert_eq!(flags(0x4E00), LETTER);
    }
}

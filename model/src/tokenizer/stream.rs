//! Incremental UTF-8 decoding of token bytes for streaming output.
//!
//! A token may end in the middle of a character (byte-level BPE and SentencePiece byte
//! fallback split emoji and CJK over several tokens). The decoder emits the longest complete
//! prefix and holds back an incomplete trailing sequence until the next push. Bytes that can
//! never become valid UTF-8 are replaced by U+FFFD at once, so output never stalls.

/// Streams token bytes out as valid UTF-8, buffering incomplete multi-byte sequences.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// Adds `bytes` and returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut at = 0;
        loop {
            match std::str::from_utf8(&self.pending[at..]) {
                Ok(s) => {
                    out.push_str(s);
                    at = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = at + e.valid_up_to();
                    // The prefix was just validated.
                    out.push_str(std::str::from_utf8(&self.pending[at..valid]).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{FFFD}');
                            at = valid + n;
                        }
                        None => {
                            // An incomplete sequence at the end: keep it for the next push.
                            at = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..at);
        out
    }

    /// Whether bytes are held back waiting for the rest of a character.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Flushes what is left; an incomplete sequence becomes U+FFFD.
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_a_two_byte_char_across_pushes() {
        let mut d = StreamDecoder::new();
        let e = "é".as_bytes();
        assert_eq!(d.push(b"caf"), "caf");
        assert_eq!(d.push(&e[..1]), "");
        assert!(d.has_pending());
        assert_eq!(d.push(&e[1..]), "é");
        assert!(!d.has_pending());
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn emoji_over_four_byte_tokens() {
        let llama = "🦙".as_bytes();
        assert_eq!(llama.len(), 4);
        let mut d = StreamDecoder::new();
        let mut got = String::new();
        for (i, b) in llama.iter().enumerate() {
            let s = d.push(std::slice::from_ref(b));
            if i < 3 {
                assert_eq!(s, "");
            }
            got.push_str(&s);
        }
        assert_eq!(got, "🦙");
        // Text and a partial character in one push.
        assert_eq!(d.push(&[b'!', b' ', llama[0], llama[1]]), "! ");
        assert_eq!(d.push(&llama[2..]), "🦙");
    }

    #[test]
    fn invalid_bytes_become_replacement_chars_and_do_not_stall() {
        let mut d = StreamDecoder::new();
        assert_eq!(d.push(&[0xFF, b'a']), "\u{FFFD}a");
        assert_eq!(d.push(&[0xE2, 0x82]), "");
        assert_eq!(d.push(b"b"), "\u{FFFD}b");
        assert_eq!(d.push(&[0xF0, 0x9F]), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }
}

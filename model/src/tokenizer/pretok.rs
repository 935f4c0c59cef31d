//! BPE pre-tokenizers: split text into words before merging, exactly as llama.cpp does.
//!
//! Each `tokenizer.ggml.pre` value maps to the list of regexes llama.cpp uses
//! (`llm_tokenizer_bpe` in llama-vocab.cpp). The regexes apply in turn, each splitting every
//! piece the previous one produced, keeping both matches and the text between them.
//!
//! Key decision: the regexes llama.cpp runs through hand-written splitters (GPT-2, Llama 3,
//! Qwen2, Qwen3.5) are ported as the same state machines, quirks included, instead of being
//! compiled: the hand-written code is what defines llama.cpp's output. The other regexes run
//! on fancy-regex the way llama.cpp runs them on `std::regex`: over a "collapsed" copy of the
//! text in which every non-ASCII codepoint is replaced by one stand-in character for its
//! category, with `\p{L}`, `\p{N}`, … rewritten into classes of those stand-ins (llama.cpp
//! PR 6920). Word boundaries are computed in codepoints and returned as slices of the input.

use fancy_regex::Regex;

use super::unicode::{self, ACCENT_MARK, LETTER, MASK_CATEGORIES, NUMBER, PUNCTUATION, SYMBOL, WHITESPACE};

const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3_ORIG: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_JAIS2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}";
const RE_DEEPSEEK3_MAIN: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;
const RE_SPARK_MAIN: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+"##;
const RE_YOUTU_MAIN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_FALCON_MAIN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_PORO: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";
const RE_TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_BAILINGMOE: &str = r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
const RE_SEED_CODER: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_UFAKZEKA: &str = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_EXAONE_MOE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+";
const RE_MINICPM5: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Escaped: the literal characters are subject to Unicode normalization by editors.
const RE_DEEPSEEK_LLM_LETTERS: &str = "\\s?[A-Za-z\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}\u{1C4}-\u{293}\
    \u{295}-\u{2AF}\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}\u{37F}\u{386}\u{388}-\u{38A}\
    \u{38C}\u{38E}-\u{3A1}\u{3A3}-\u{3F5}\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}\
    \u{10A0}-\u{10C5}\u{13A0}-\u{13F5}\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\
    \u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\
    \u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\
    \u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\
    \u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\
    \u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\
    \u{212A}-\u{212D}\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\
    \u{2183}\u{2184}\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}\
    \u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}\u{A78B}-\u{A78E}\
    \u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\
    \u{10400}-\u{1044F}\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\
    \u{10CF2}\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+";

/// How llama.cpp configures the vocab for one `tokenizer.ggml.pre` value.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PreConfig {
    pub regexes: &'static [&'static str],
    /// A word that is itself a token is emitted without merging.
    pub ignore_merges: bool,
    /// Default for `tokenizer.ggml.add_bos_token` (BPE vocabs default to false).
    pub add_bos: bool,
    /// The vocab has no BOS unless the file names one.
    pub no_default_bos: bool,
}

const fn cfg(regexes: &'static [&'static str]) -> PreConfig {
    PreConfig { regexes, ignore_merges: false, add_bos: false, no_default_bos: false }
}

const DEFAULT: &[&str] = &[r"[\p{P}\$\+<=>\^~\|]+", RE_GPT2, r"\p{N}+", "[0-9][0-9][0-9]"];

/// The configuration llama.cpp uses for `pre`, or `None` for a value it does not know (or
/// that needs a splitter shoal has not ported: kimi-k2, afmoe, tiny_aya, superbpe, gemma4…).
pub(crate) fn config_for(pre: &str) -> Option<PreConfig> {
    let c = match pre {
        "default" => cfg(DEFAULT),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" => PreConfig { ignore_merges: true, add_bos: true, ..cfg(&[RE_LLAMA3]) },
        "dbrx" | "smaug-bpe" => cfg(&[RE_LLAMA3]),
        "jais-2" => cfg(&[RE_JAIS2]),
        "chatglm-bpe" => PreConfig { no_default_bos: true, ..cfg(&[RE_LLAMA3]) },
        "glm4" | "glm5" => PreConfig { no_default_bos: true, ignore_merges: true, ..cfg(&[RE_LLAMA3]) },
        "deepseek-llm" => cfg(&[
            r"[\r\n]",
            RE_DEEPSEEK_LLM_LETTERS,
            r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
            r"\s+$",
            r"[一-龥ࠀ-一가-퟿]+",
            r"\p{N}+",
        ]),
        "deepseek-coder" => cfg(&[r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"]),
        "deepseek-v3" | "hunyuan-dense" | "joyai-llm" | "hy_v4" => {
            cfg(&[r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", RE_DEEPSEEK3_MAIN])
        }
        "spark2_5" => cfg(&[r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", RE_SPARK_MAIN, r"\p{N}"]),
        "youtu" => PreConfig {
            ignore_merges: true,
            ..cfg(&[r"[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+", RE_YOUTU_MAIN])
        },
        "falcon" => cfg(&[r"[\p{P}\$\+<=>\^~\|`]+", RE_FALCON_MAIN, "[0-9][0-9][0-9]"]),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
            cfg(&[r"\p{N}", RE_GPT2])
        }
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de" | "a.x-4.0"
        | "mellum" | "modern-bert" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe" | "mpt" | "olmo"
        | "jais" | "trillion" | "granite-docling" | "exaone4" => cfg(&[RE_GPT2]),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" | "grok-2" => cfg(&[RE_QWEN2]),
        "qwen35" => cfg(&[RE_QWEN35]),
        "poro-chat" | "bloom" | "gpt3-finnish" => cfg(&[RE_PORO]),
        "viking" => cfg(&[RE_PORO, r"\p{N}"]),
        "tekken" => PreConfig { ignore_merges: true, add_bos: true, ..cfg(&[RE_TEKKEN]) },
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => cfg(&[RE_GPT4O]),
        "bailingmoe" | "bailingmoe2" | "llada-moe" => cfg(&[RE_BAILINGMOE]),
        "seed-coder" => cfg(&[RE_SEED_CODER]),
        "ufakzeka" => cfg(&[RE_UFAKZEKA]),
        "laguna" => cfg(&[r"[^\n]+|[\n]+", RE_QWEN2]),
        "exaone-moe" => cfg(&[RE_EXAONE_MOE]),
        "minicpm5" => PreConfig { ignore_merges: true, ..cfg(&[r"\p{N}{1,3}", RE_MINICPM5]) },
        _ => return None,
    };
    Some(c)
}

/// The default configuration, used when `tokenizer.ggml.pre` is missing.
pub(crate) fn default_config() -> PreConfig {
    cfg(DEFAULT)
}

enum Step {
    Gpt2,
    /// The Llama 3 family: digit runs cut every `max_digits`; `marks` adds `\p{M}` to letters.
    Llama3Like { max_digits: usize, marks: bool },
    /// A compiled regex; `collapsed` when it runs over the category-collapsed text.
    Regex { re: Regex, collapsed: bool },
}

/// The unicode categories llama.cpp collapses, the stand-in character for each and the ASCII
/// members of the category.
const UCATS: &[(&str, u16)] = &[
    (r"\p{N}", NUMBER),
    (r"\p{L}", LETTER),
    (r"\p{P}", PUNCTUATION),
    (r"\p{M}", ACCENT_MARK),
    (r"\p{S}", SYMBOL),
    (r"\p{Lu}", LETTER),
    (r"\p{Ll}", LETTER),
    (r"\p{Lt}", LETTER),
    (r"\p{Lm}", LETTER),
    (r"\p{Lo}", LETTER),
];

fn stand_in(category: u16) -> Option<(char, &'static str)> {
    Some(match category {
        NUMBER => ('\u{D1}', "0-9"),
        LETTER => ('\u{D2}', "A-Za-z"),
        PUNCTUATION => ('\u{D3}', r"\x21-\x23\x25-\x2A\x2C-\x2F\x3A-\x3B\x3F-\x40\x5B-\x5D\x5F\x7B\x7D"),
        ACCENT_MARK => ('\u{D4}', ""),
        SYMBOL => ('\u{D5}', r"\x24\x2B\x3C-\x3E\x5E\x60\x7C\x7E"),
        _ => return None,
    })
}

fn uses_categories(expr: &str) -> bool {
    UCATS.iter().any(|(pat, _)| expr.contains(pat))
}

/// Rewrites `\p{…}` into classes over the stand-in characters, as llama.cpp does.
fn collapse_regex(expr: &str) -> Result<String, String> {
    if !expr.is_ascii() {
        return Err(format!("regex {expr:?} mixes unicode categories and non-ASCII characters"));
    }
    let b = expr.as_bytes();
    let mut out = String::with_capacity(expr.len() * 2);
    let mut inside = false;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'[' && (i == 0 || b[i - 1] != b'\\') {
            out.push('[');
            inside = true;
            i += 1;
            continue;
        }
        if inside && b[i] == b']' && b[i - 1] != b'\\' {
            out.push(']');
            inside = false;
            i += 1;
            continue;
        }
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1] == b'p'
            && b[i + 2] == b'{'
            && let Some(close) = expr[i + 3..].find('}').map(|p| p + i + 3).filter(|&c| c <= i + 10)
            && let Some(&(_, cat)) = UCATS.iter().find(|(p, _)| *p == &expr[i..=close])
        {
            let (c, ascii) = stand_in(cat).expect("every collapsed category has a stand-in");
            if !inside {
                out.push('[');
            }
            out.push_str(&format!(r"\x{{{:X}}}", c as u32));
            out.push_str(ascii);
            if !inside {
                out.push(']');
            }
            i = close + 1;
            continue;
        }
        out.push(b[i] as char);
        i += 1;
    }
    Ok(out)
}

/// Splits text into words for BPE.
pub(crate) struct PreTokenizer {
    steps: Vec<Step>,
}

impl PreTokenizer {
    pub(crate) fn new(regexes: &[&str]) -> Result<PreTokenizer, String> {
        let mut steps = Vec::with_capacity(regexes.len());
        for &expr in regexes {
            let step = match expr {
                RE_GPT2 => Step::Gpt2,
                RE_LLAMA3 | RE_LLAMA3_ORIG => Step::Llama3Like { max_digits: 3, marks: false },
                RE_QWEN2 => Step::Llama3Like { max_digits: 1, marks: false },
                RE_QWEN35 => Step::Llama3Like { max_digits: 1, marks: true },
                _ => {
                    let collapsed = uses_categories(expr);
                    let src = if collapsed { collapse_regex(expr)? } else { expr.to_string() };
                    let re = Regex::new(&src).map_err(|e| format!("pre-tokenizer regex {expr:?}: {e}"))?;
                    Step::Regex { re, collapsed }
                }
            };
            steps.push(step);
        }
        Ok(PreTokenizer { steps })
    }

    /// The words of `text`, in order; their concatenation is `text`.
    pub(crate) fn split<'t>(&self, text: &'t str) -> Result<Vec<&'t str>, String> {
        let cpts: Vec<u32> = text.chars().map(|c| c as u32).collect();
        let mut lens = vec![cpts.len()];
        let mut collapsed: Option<Vec<char>> = None;
        let mut plain: Option<Vec<char>> = None;
        for step in &self.steps {
            lens = match step {
                Step::Gpt2 => split_custom(&cpts, &lens, gpt2_chunk),
                Step::Llama3Like { max_digits, marks } => split_custom(&cpts, &lens, |c, ini, end, out| {
                    llama3_chunk(c, ini, end, *max_digits, *marks, out)
                }),
                Step::Regex { re, collapsed: true } => {
                    let t = collapsed.get_or_insert_with(|| collapse_text(&cpts));
                    split_regex(re, t, &lens)?
                }
                Step::Regex { re, collapsed: false } => {
                    let t = plain.get_or_insert_with(|| whitespace_fallback_text(&cpts));
                    split_regex(re, t, &lens)?
                }
            };
        }
        // Codepoint lengths back to byte slices.
        let mut words = Vec::with_capacity(lens.len());
        let mut it = text.char_indices().map(|(i, _)| i).chain(std::iter::once(text.len()));
        let mut start = it.next().unwrap_or(0);
        for &n in &lens {
            if n == 0 {
                continue;
            }
            let end = it.nth(n - 1).unwrap_or(text.len());
            words.push(&text[start..end]);
            start = end;
        }
        Ok(words)
    }
}

/// The collapsed text: ASCII kept, non-ASCII whitespace as U+000B, other codepoints as the
/// stand-in of their category (U+00D0 when the category has none).
fn collapse_text(cpts: &[u32]) -> Vec<char> {
    cpts.iter()
        .map(|&c| {
            if c < 128 {
                return c as u8 as char;
            }
            let f = unicode::flags(c);
            if f & WHITESPACE != 0 {
                '\u{0B}'
            } else {
                stand_in(f & MASK_CATEGORIES).map_or('\u{D0}', |(s, _)| s)
            }
        })
        .collect()
}

/// The text for regexes without categories: non-ASCII whitespace as U+000B (std::wregex's
/// `\s` is ASCII-only, so llama.cpp substitutes).
fn whitespace_fallback_text(cpts: &[u32]) -> Vec<char> {
    cpts.iter()
        .map(|&c| {
            if c > 0x7F && unicode::flags(c) & WHITESPACE != 0 {
                '\u{0B}'
            } else {
                char::from_u32(c).unwrap_or('\u{FFFD}')
            }
        })
        .collect()
}

/// Splits each chunk by `re`, keeping matches and the gaps between them (llama.cpp's
/// `unicode_regex_split_stl`). The regex sees only the chunk.
fn split_regex(re: &Regex, text: &[char], lens: &[usize]) -> Result<Vec<usize>, String> {
    let mut out = Vec::with_capacity(lens.len());
    let mut start = 0;
    let mut chunk = String::new();
    let mut char_at = Vec::new(); // byte offset in `chunk` -> codepoint index
    for &len in lens {
        chunk.clear();
        char_at.clear();
        for (i, &c) in text[start..start + len].iter().enumerate() {
            chunk.push(c);
            char_at.resize(chunk.len(), i);
        }
        char_at.push(len);
        let mut prev = 0;
        for m in re.find_iter(&chunk) {
            let m = m.map_err(|e| format!("pre-tokenizer regex failed: {e}"))?;
            let (ms, me) = (char_at[m.start()], char_at[m.end()]);
            if ms > prev {
                out.push(ms - prev);
            }
            if me > ms {
                out.push(me - ms);
            }
            prev = me;
        }
        if prev < len {
            out.push(len - prev);
        }
        start += len;
    }
    Ok(out)
}

fn split_custom(cpts: &[u32], lens: &[usize], chunk: impl Fn(&[u32], usize, usize, &mut Vec<usize>)) -> Vec<usize> {
    let mut out = Vec::with_capacity(lens.len());
    let mut start = 0;
    for &len in lens {
        chunk(cpts, start, start + len, &mut out);
        start += len;
    }
    out
}

const OUT_OF_RANGE: u32 = 0xFFFF_FFFF;

/// Access to one chunk `[ini, end)`: codepoints and flags outside it read as nothing.
struct Chunk<'a> {
    cpts: &'a [u32],
    ini: usize,
    end: usize,
    prev_end: usize,
}

impl Chunk<'_> {
    fn cpt(&self, pos: usize) -> u32 {
        if self.ini <= pos && pos < self.end { self.cpts[pos] } else { OUT_OF_RANGE }
    }
    fn flags(&self, pos: usize) -> u16 {
        if self.ini <= pos && pos < self.end { unicode::flags(self.cpts[pos]) } else { 0 }
    }
    /// Ends the current word at `end`; returns its length.
    fn add(&mut self, end: usize, out: &mut Vec<usize>) -> usize {
        let len = end - self.prev_end;
        if len > 0 {
            out.push(len);
        }
        self.prev_end = end;
        len
    }
}

fn is(flags: u16, bits: u16) -> bool {
    flags & bits != 0
}

/// Port of `unicode_regex_split_custom_gpt2`:
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`
fn gpt2_chunk(cpts: &[u32], ini: usize, end: usize, out: &mut Vec<usize>) {
    let mut c = Chunk { cpts, ini, end, prev_end: ini };
    let mut pos = ini;
    while pos < end {
        let cpt = c.cpt(pos);
        let flags = c.flags(pos);
        if cpt == '\'' as u32 && pos + 1 < end {
            let next = c.cpt(pos + 1);
            if [b's', b't', b'm', b'd'].iter().any(|&x| next == x as u32) {
                pos += c.add(pos + 2, out);
                continue;
            }
            if pos + 2 < end {
                let nn = c.cpt(pos + 2);
                let pair = |a: u8, b: u8| next == a as u32 && nn == b as u32;
                if pair(b'r', b'e') || pair(b'v', b'e') || pair(b'l', b'l') {
                    pos += c.add(pos + 3, out);
                    continue;
                }
            }
        }
        let space = cpt == ' ' as u32;
        let mut flags2 = if space { c.flags(pos + 1) } else { flags };
        if is(flags2, LETTER) || is(flags2, NUMBER) {
            let class = if is(flags2, LETTER) { LETTER } else { NUMBER };
            pos += space as usize;
            while is(flags2, class) {
                pos += 1;
                flags2 = c.flags(pos);
            }
            c.add(pos, out);
            continue;
        }
        let other = |f: u16| !is(f, WHITESPACE | LETTER | NUMBER) && f != 0;
        if other(flags2) {
            pos += space as usize;
            while other(flags2) {
                pos += 1;
                flags2 = c.flags(pos);
            }
            c.add(pos, out);
            continue;
        }
        let mut n_ws = 0;
        while is(c.flags(pos + n_ws), WHITESPACE) {
            n_ws += 1;
        }
        if n_ws > 1 && c.cpt(pos + n_ws) != OUT_OF_RANGE {
            pos += n_ws - 1;
            c.add(pos, out);
            continue;
        }
        if n_ws > 0 {
            pos += n_ws;
            c.add(pos, out);
            continue;
        }
        pos += 1;
        c.add(pos, out);
    }
}

/// Port of `unicode_regex_split_custom_llama3` (`max_digits` 3), `_qwen2` (1) and `_qwen35`
/// (1, with marks): `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
/// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`. Only ASCII letters lowercase to the
/// contraction letters, so an ASCII lowercase is exact here.
fn llama3_chunk(cpts: &[u32], ini: usize, end: usize, max_digits: usize, marks: bool, out: &mut Vec<usize>) {
    let mut c = Chunk { cpts, ini, end, prev_end: ini };
    let lower = |x: u32| if (b'A' as u32..=b'Z' as u32).contains(&x) { x + 32 } else { x };
    let letter = if marks { LETTER | ACCENT_MARK } else { LETTER };
    let is_rn = |x: u32| x == '\r' as u32 || x == '\n' as u32;
    let mut pos = ini;
    while pos < end {
        let cpt = c.cpt(pos);
        let flags = c.flags(pos);
        if cpt == '\'' as u32 && pos + 1 < end {
            let next = lower(c.cpt(pos + 1));
            if [b's', b't', b'm', b'd'].iter().any(|&x| next == x as u32) {
                pos += c.add(pos + 2, out);
                continue;
            }
            if pos + 2 < end {
                let nn = lower(c.cpt(pos + 2));
                let pair = |a: u8, b: u8| next == a as u32 && nn == b as u32;
                if pair(b'r', b'e') || pair(b'v', b'e') || pair(b'l', b'l') {
                    pos += c.add(pos + 3, out);
                    continue;
                }
            }
        }
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !(is_rn(cpt) || is(flags, NUMBER)) && (is(flags, letter) || is(c.flags(pos + 1), letter)) {
            pos += 1;
            while is(c.flags(pos), letter) {
                pos += 1;
            }
            c.add(pos, out);
            continue;
        }
        // \p{N}{1,max_digits}
        if is(flags, NUMBER) {
            let mut first = pos;
            while is(c.flags(pos), NUMBER) {
                pos += 1;
                if pos - first >= max_digits {
                    c.add(pos, out);
                    first = pos;
                }
            }
            c.add(pos, out);
            continue;
        }
        // <space>?[^\s\p{L}\p{N}]+[\r\n]*  (llama.cpp tests the first codepoint's flags here)
        let excluded = WHITESPACE | letter | NUMBER;
        let mut flags2 = if cpt == ' ' as u32 { c.flags(pos + 1) } else { flags };
        if !is(flags2, excluded) && flags != 0 {
            pos += (cpt == ' ' as u32) as usize;
            while !is(flags2, excluded) && flags2 != 0 {
                pos += 1;
                flags2 = c.flags(pos);
            }
            while is_rn(c.cpt(pos)) {
                pos += 1;
            }
            c.add(pos, out);
            continue;
        }
        let mut n_ws = 0;
        let mut last_rn_end = 0;
        while is(c.flags(pos + n_ws), WHITESPACE) {
            if is_rn(c.cpt(pos + n_ws)) {
                last_rn_end = pos + n_ws + 1;
            }
            n_ws += 1;
        }
        // \s*[\r\n]+
        if last_rn_end > 0 {
            pos = last_rn_end;
            c.add(pos, out);
            continue;
        }
        // \s+(?!\S)
        if n_ws > 1 && c.cpt(pos + n_ws) != OUT_OF_RANGE {
            pos += n_ws - 1;
            c.add(pos, out);
            continue;
        }
        if n_ws > 0 {
            pos += n_ws;
            c.add(pos, out);
            continue;
        }
        pos += 1;
        c.add(pos, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(regexes: &[&str], text: &str) -> Vec<String> {
        let p = PreTokenizer::new(regexes).unwrap();
        p.split(text).unwrap().into_iter().map(String::from).collect()
    }

    #[test]
    fn every_known_pre_tokenizer_compiles() {
        let names = [
            "default", "llama-bpe", "dbrx", "jais-2", "chatglm-bpe", "deepseek-llm", "deepseek-coder",
            "deepseek-v3", "spark2_5", "youtu", "falcon", "smollm", "gpt-2", "qwen2", "qwen35", "bloom",
            "viking", "tekken", "gpt-4o", "bailingmoe", "seed-coder", "ufakzeka", "laguna", "exaone-moe",
            "minicpm5",
        ];
        for n in names {
            let c = config_for(n).unwrap_or_else(|| panic!("{n} unknown"));
            let p = PreTokenizer::new(c.regexes).unwrap_or_else(|e| panic!("{n}: {e}"));
            let words = p.split("Hello, World! 12345 ünïcödé\n\n  tabs\t'll 🦙").unwrap();
            assert_eq!(words.concat(), "Hello, World! 12345 ünïcödé\n\n  tabs\t'll 🦙", "{n}");
        }
        assert!(config_for("no-such-pre").is_none());
    }

    #[test]
    fn gpt2_splits_like_the_regex() {
        assert_eq!(
            split(&[RE_GPT2], "Hello world's  3.14  x"),
            ["Hello", " world", "'s", " ", " 3", ".", "14", " ", " x"]
        );
    }

    #[test]
    fn llama3_groups_digits_by_three_and_qwen2_by_one() {
        assert_eq!(split(&[RE_LLAMA3], "1234567 ab"), ["123", "456", "7", " ab"]);
        assert_eq!(split(&[RE_QWEN2], "123 ab"), ["1", "2", "3", " ab"]);
        assert_eq!(split(&[RE_LLAMA3], "a\n\n  b"), ["a", "\n\n", " ", " b"]);
        assert_eq!(split(&[RE_LLAMA3], "I'M ok"), ["I", "'M", " ok"]);
    }

    #[test]
    fn collapsed_regexes_see_categories() {
        assert_eq!(collapse_regex(r"\p{N}").unwrap(), r"[\x{D1}0-9]");
        assert_eq!(collapse_regex(r"[^\s\p{L}]").unwrap(), r"[^\s\x{D2}A-Za-z]");
        // \p{N} splits out every digit, including non-ASCII ones, then GPT-2 splits the rest.
        assert_eq!(split(&[r"\p{N}", RE_GPT2], "ab12٣ c"), ["ab", "1", "2", "٣", " c"]);
    }
}

//! Conformance with llama.cpp's tokenizer: its own test vectors (tests/test-tokenizer-0.cpp:
//! `.inp` holds inputs separated by "\n__ggml_vocab_test__\n", `.out` one line of ids per
//! input; encoded with add_special = false, parse_special = false), round trips, and spot
//! checks on the real models' vocabs.
//!
//! The vocab files come from `SHOAL_VOCAB_DIR` (default `$HOME/.cache/shoal/vocab`), the models
//! from `SHOAL_MODELS_DIR` (default `$HOME/.cache/shoal/models`); `scripts/fetch-models`
//! downloads both. A missing file fails the test rather than skipping it.

use std::path::PathBuf;

use shoal_model::gguf::GgufFile;
use shoal_model::tokenizer::{StreamDecoder, Tokenizer};

fn dir(var: &str, default: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is not set")).join(default),
    }
}

fn require(path: PathBuf) -> PathBuf {
    assert!(path.exists(), "{} is missing: run scripts/fetch-models first", path.display());
    path
}

fn load(path: &PathBuf) -> Tokenizer {
    let f = GgufFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Tokenizer::from_gguf(&f).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn vocab_tokenizer(name: &str) -> (Tokenizer, Vec<(String, Vec<u32>)>) {
    let d = dir("SHOAL_VOCAB_DIR", ".cache/shoal/vocab");
    let gguf = require(d.join(format!("ggml-vocab-{name}.gguf")));
    let inp = std::fs::read_to_string(require(d.join(format!("ggml-vocab-{name}.gguf.inp")))).unwrap();
    let out = std::fs::read_to_string(require(d.join(format!("ggml-vocab-{name}.gguf.out")))).unwrap();
    // As read_tests(): split on the separator; a trailing separator ends the last input.
    let sep = "\n__ggml_vocab_test__\n";
    let mut inputs = Vec::new();
    let mut rest = inp.as_str();
    while !rest.is_empty() {
        match rest.find(sep) {
            Some(p) => {
                inputs.push(rest[..p].to_string());
                rest = &rest[p + sep.len()..];
            }
            None => {
                inputs.push(rest.to_string());
                break;
            }
        }
    }
    let outputs: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(inputs.len(), outputs.len(), "{name}: .inp and .out disagree on the number of tests");
    (load(&gguf), inputs.into_iter().zip(outputs).collect())
}

/// Runs every vector; returns (passed, total) and asserts all passed.
fn run_vectors(name: &str, round_trip: bool) {
    let t0 = std::time::Instant::now();
    let (tok, tests) = vocab_tokenizer(name);
    eprintln!("{name}: loaded {} tokens in {:?}", tok.n_vocab(), t0.elapsed());
    let mut failures = Vec::new();
    for (text, want) in &tests {
        let got = tok.encode(text, false, false).unwrap();
        if &got != want {
            failures.push(format!("{text:?}\n   want {want:?}\n   got  {got:?}"));
        }
        if round_trip {
            let back = tok.decode(&got, true);
            if &back != text {
                failures.push(format!("{text:?} decodes back as {back:?}"));
            }
        }
    }
    eprintln!("{name}: {}/{} vectors pass", tests.len() - failures.len(), tests.len());
    assert!(failures.is_empty(), "{name}: {} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn llama_bpe_vectors() {
    run_vectors("llama-bpe", true);
}

#[test]
fn qwen2_vectors() {
    run_vectors("qwen2", true);
}

#[test]
fn gpt2_vectors() {
    run_vectors("gpt-2", true);
}

#[test]
fn llama_spm_vectors() {
    run_vectors("llama-spm", false);
}

#[test]
fn llama_spm_adds_bos_and_parses_special() {
    let (tok, _) = vocab_tokenizer("llama-spm");
    assert_eq!(tok.bos(), Some(1));
    assert_eq!(tok.eos(), Some(2));
    let ids = tok.encode("Hello</s>", true, true).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert!(tok.is_eog(2));
    // Decoding keeps SentencePiece's prefix space; special pieces only when asked.
    assert_eq!(tok.decode(&ids, false), " Hello");
    assert_eq!(tok.decode(&ids, true), "<s> Hello</s>");
}

fn model_tokenizer(file: &str) -> (GgufFile, Tokenizer) {
    let path = require(dir("SHOAL_MODELS_DIR", ".cache/shoal/models").join(file));
    let t0 = std::time::Instant::now();
    let f = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&f).unwrap();
    eprintln!("{file}: tokenizer loaded in {:?}", t0.elapsed());
    (f, tok)
}

/// Ids of vocab texts (byte-level alphabet: Ġ is a space, Ċ a newline).
fn ids(tok: &Tokenizer, texts: &[&str]) -> Vec<u32> {
    texts.iter().map(|t| tok.token_id(t).unwrap_or_else(|| panic!("{t:?} is not a token"))).collect()
}

const ROUND_TRIP: &[&str] = &[
    "Hello world",
    "  leading spaces and trailing  ",
    "fn main() {\n    println!(\"hi\");\n}\n",
    "Ünïcödé — 日本語のテキスト, emoji 🦙🚀 and digits 1234567890",
    "tabs\tand\r\nCRLF\n\n\n",
    "<|im_start|>user\nnot parsed<|im_end|>",
];

#[test]
fn smollm2_model_vocab() {
    let (_f, tok) = model_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(tok.n_vocab(), 49152);
    assert_eq!((tok.bos(), tok.eos()), (Some(1), Some(2)));
    // add_bos_token is false in the file.
    assert_eq!(tok.encode("Hi", true, false).unwrap(), ids(&tok, &["Hi"]));
    // smollm splits every digit, then GPT-2 words.
    assert_eq!(tok.encode("Hello world", false, false).unwrap(), ids(&tok, &["Hello", "Ġworld"]));
    assert_eq!(tok.encode("2024", false, false).unwrap(), ids(&tok, &["2", "0", "2", "4"]));
    // Chat markers are control tokens: parsed only with parse_special.
    let im = tok.encode("<|im_start|>user\nHi<|im_end|>", false, true).unwrap();
    assert_eq!(im, ids(&tok, &["<|im_start|>", "user", "Ċ", "Hi", "<|im_end|>"]));
    assert_eq!(im[0], 1);
    let plain = tok.encode("<|im_start|>", false, false).unwrap();
    assert!(!plain.contains(&1), "control token parsed without parse_special: {plain:?}");
    assert!(tok.is_eog(2) && tok.is_eog(0), "<|im_end|> and <|endoftext|> end generation");
    assert!(!tok.is_eog(1));
    assert_eq!(tok.token_bytes(2, false), b"");
    assert_eq!(tok.token_bytes(2, true), b"<|im_end|>");
    for s in ROUND_TRIP {
        assert_eq!(tok.decode(&tok.encode(s, false, false).unwrap(), true), *s);
    }
}

#[test]
fn qwen25_coder_model_vocab() {
    let (_f, tok) = model_tokenizer("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    assert_eq!(tok.n_vocab(), 151936);
    assert_eq!(tok.eos(), Some(151645));
    assert_eq!(tok.token_text(151645), Some("<|im_end|>"));
    // No BOS is added (add_bos_token = false).
    assert_eq!(tok.encode("Hello world", true, false).unwrap(), ids(&tok, &["Hello", "Ġworld"]));
    // qwen2 splits digits one by one.
    assert_eq!(tok.encode("x=42", false, false).unwrap(), ids(&tok, &["x", "=", "4", "2"]));
    assert_eq!(tok.encode("\n\n", false, false).unwrap(), ids(&tok, &["ĊĊ"]));
    let im = tok.encode("<|im_start|>system\nYou<|im_end|>\n", false, true).unwrap();
    assert_eq!(im, ids(&tok, &["<|im_start|>", "system", "Ċ", "You", "<|im_end|>", "Ċ"]));
    // <tool_call> is user-defined: split out even without parse_special.
    assert_eq!(tok.encode("<tool_call>", false, false).unwrap(), [151657]);
    for eog in ["<|im_end|>", "<|endoftext|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"] {
        assert!(tok.is_eog(tok.token_id(eog).unwrap()), "{eog} should end generation");
    }
    assert!(!tok.is_eog(tok.token_id("<|im_start|>").unwrap()));
    for s in ROUND_TRIP {
        assert_eq!(tok.decode(&tok.encode(s, false, false).unwrap(), true), *s);
    }
    // Streaming an emoji token by token yields it whole, once.
    let ids = tok.encode("🦙!", false, false).unwrap();
    let mut d = StreamDecoder::new();
    let mut out = String::new();
    for &id in &ids {
        out.push_str(&d.push(&tok.token_bytes(id, false)));
    }
    out.push_str(&d.finish());
    assert_eq!(out, "🦙!");
}

#[test]
fn qwen2_vocab_loads_fast() {
    let d = dir("SHOAL_VOCAB_DIR", ".cache/shoal/vocab");
    let path = require(d.join("ggml-vocab-qwen2.gguf"));
    let f = GgufFile::open(&path).unwrap();
    let t0 = std::time::Instant::now();
    let tok = Tokenizer::from_gguf(&f).unwrap();
    let load = t0.elapsed();
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(2000);
    let t1 = std::time::Instant::now();
    let n = tok.encode(&text, false, false).unwrap().len();
    let enc = t1.elapsed();
    eprintln!("qwen2: from_gguf {load:?}; {} bytes -> {n} tokens in {enc:?}", text.len());
    // Generous bounds: debug builds and loaded CI machines are slow.
    assert!(load.as_secs_f64() < 5.0, "loading took {load:?}");
    assert!(enc.as_secs_f64() < 5.0, "encoding took {enc:?}");
}

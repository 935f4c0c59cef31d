//! The chat templates stored in the real models render conversations exactly as Hugging Face
//! `apply_chat_template` does (expected strings written out by hand from the templates).
//!
//! Models come from `SHOAL_MODELS_DIR` (default `$HOME/.cache/shoal/models`); run
//! `scripts/fetch-models` first. A missing file fails the test.

use std::path::PathBuf;

use shoal_model::chat::{ChatMessage, ChatTemplate};
use shoal_model::gguf::GgufFile;
use shoal_model::tokenizer::Tokenizer;

fn template(file: &str) -> (ChatTemplate, Tokenizer) {
    let dir = match std::env::var_os("SHOAL_MODELS_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is not set")).join(".cache/shoal/models"),
    };
    let path = dir.join(file);
    assert!(path.exists(), "{} is missing: run scripts/fetch-models first", path.display());
    let f = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&f).unwrap();
    let t = ChatTemplate::from_gguf(&f, &tok).unwrap().expect("the model has a chat template");
    (t, tok)
}

fn conversation() -> Vec<ChatMessage> {
    vec![ChatMessage::new("system", "You are terse."), ChatMessage::new("user", "Hi")]
}

#[test]
fn smollm2_renders_chatml() {
    let (t, tok) = template("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(
        t.render(&conversation(), true).unwrap(),
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // Without a system message SmolLM2 supplies its own.
    assert_eq!(
        t.render(&[ChatMessage::new("user", "Hi")], false).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n"
    );
    // The rendered prompt tokenizes with the markers as single control tokens.
    let ids = tok.encode(&t.render(&conversation(), true).unwrap(), false, true).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 3, "three <|im_start|>");
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2, "two <|im_end|>");
}

#[test]
fn qwen25_coder_renders_chatml_with_default_system_prompt() {
    let (t, _) = template("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    assert_eq!(
        t.render(&conversation(), true).unwrap(),
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        t.render(&[ChatMessage::new("user", "Hi")], true).unwrap(),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // A multi-turn conversation with an assistant reply.
    let msgs = [
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Hello!"),
        ChatMessage::new("user", "Bye"),
    ];
    assert_eq!(
        t.render(&msgs, false).unwrap(),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    );
}

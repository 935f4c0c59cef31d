//! Fuzzes the OpenAI-compatible API's request handling up to generation: JSON body parsing
//! and every check `/v1/completions` and `/v1/chat/completions` run (tokenizing the prompt,
//! rendering the chat template, parameter ranges, context length), through
//! `shoal_coordinator::api::check_request` with SmolLM2's real tokenizer and chat template.
//! The first input byte picks the endpoint. Any body must give `Ok` or a 4xx, never a panic.
//!
//! Needs the default model (`scripts/fetch-models`); `SHOAL_MODEL` overrides its path.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shoal_coordinator::api::{RequestContext, check_request};
use shoal_model::chat::ChatTemplate;
use shoal_model::gguf::GgufFile;
use shoal_model::tokenizer::Tokenizer;

struct Model {
    tokenizer: Tokenizer,
    chat: Option<ChatTemplate>,
}

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let path = std::env::var("SHOAL_MODEL").unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_default();
            format!("{home}/.cache/shoal/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
        let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{path}: {e} (run scripts/fetch-models)"));
        let tokenizer = Tokenizer::from_gguf(&file).expect("tokenizer");
        let chat = ChatTemplate::from_gguf(&file, &tokenizer).expect("chat template");
        Model { tokenizer, chat }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    let m = model();
    let ctx = RequestContext { tokenizer: &m.tokenizer, chat: m.chat.as_ref(), model: "smollm2", n_ctx: 2048 };
    let endpoint = if pick % 2 == 0 { "/v1/completions" } else { "/v1/chat/completions" };
    if let Err((status, msg)) = check_request(&ctx, endpoint, body) {
        assert!((400..500).contains(&status), "{status}: {msg}");
        assert!(!msg.is_empty());
    }
});

//! `api::check_request`, the request checks the API runs before generating (and the entry
//! point of the `api_request` fuzz target), answers as the server does.

mod common;

use common::{SMOLLM2, model_path};
use shoal_coordinator::api::{RequestContext, check_request};
use shoal_model::chat::ChatTemplate;
use shoal_model::gguf::GgufFile;
use shoal_model::tokenizer::Tokenizer;

#[test]
fn request_checks_answer_as_the_server_does() {
    let file = GgufFile::open(model_path(SMOLLM2)).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let chat = ChatTemplate::from_gguf(&file, &tok).unwrap();
    let ctx = RequestContext { tokenizer: &tok, chat: chat.as_ref(), model: "smol", n_ctx: 64 };
    let chat_ep = "/v1/chat/completions";
    let ok = |ep: &str, b: &str| check_request(&ctx, ep, b.as_bytes());
    assert_eq!(ok(chat_ep, r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#), Ok(()));
    assert_eq!(ok("/v1/completions", r#"{"prompt":"Once upon","model":"smol"}"#), Ok(()));
    assert_eq!(ok("/v1/completions", r#"{"prompt":[1,2,3]}"#), Ok(()));
    let bad = [
        (chat_ep, r#"{"messages":[]}"#, 400, "messages is empty"),
        (chat_ep, r#"{"messages":[{"role":"robot","content":"x"}]}"#, 400, "unknown role"),
        (chat_ep, r#"{"messages":[{"role":"user","content":"x"}],"temperature":3}"#, 400, "temperature must be in [0, 2]"),
        (chat_ep, r#"{"messages":[{"role":"user","content":"x"}],"model":"gpt-9"}"#, 404, "does not exist"),
        (chat_ep, r#"{"messages":[{"role":"user","content":"x"}],"n":0}"#, 400, "n must be at least 1"),
        (chat_ep, r#"{"messages": "#, 400, "not a valid request"),
        ("/v1/completions", r#"{"prompt":[999999]}"#, 400, "outside the vocabulary"),
        ("/v1/completions", &format!(r#"{{"prompt":"{}"}}"#, "word ".repeat(100)), 400, "the context is 64"),
        ("/v1/completions", r#"{"prompt":"x","max_tokens":-1}"#, 400, "max_tokens must be >= 0"),
        ("/v1/embeddings", "{}", 404, "no endpoint"),
    ];
    for (ep, body, status, msg) in bad {
        let (code, text) = ok(ep, body).unwrap_err();
        assert_eq!(code, status, "{body}: {text}");
        assert!(text.contains(msg), "{body}: {text}");
    }
}

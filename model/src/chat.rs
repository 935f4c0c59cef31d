//! Chat templates: the Jinja template in `tokenizer.chat_template`, rendered like Hugging Face
//! `apply_chat_template` does.
//!
//! Renders with minijinja configured as HF configures Jinja2: `trim_blocks` and
//! `lstrip_blocks` on, trailing newline dropped, Python string/dict methods
//! (`minijinja_contrib::pycompat`), `raise_exception(msg)`, `strftime_now(fmt)` and a `tojson`
//! that formats like Python's `json.dumps(ensure_ascii=False)`. The context has `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token` and `tools` (none).
//!
//! Key decision: `strftime_now` uses UTC (no time-zone database in the library); HF uses local
//! time. Errors (syntax, `raise_exception`, a failing filter) are `Error::ChatTemplate`, never
//! a panic. This module must not tokenize: callers encode the rendered text with
//! `parse_special = true`.

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};

use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

const NAME: &str = "chat";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).field("eos_token", &self.eos_token).finish()
    }
}

fn template_err(e: minijinja::Error) -> Error {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    Error::ChatTemplate(msg)
}

impl ChatTemplate {
    /// From `tokenizer.chat_template`; `None` when the file has none. BOS and EOS texts come
    /// from the tokenizer (empty when it has no such token).
    pub fn from_gguf(f: &GgufFile, tok: &Tokenizer) -> Result<Option<ChatTemplate>> {
        let Some(source) = f.get_str("tokenizer.chat_template")? else { return Ok(None) };
        let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
        ChatTemplate::new(source, &text(tok.bos()), &text(tok.eos())).map(Some)
    }

    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| {
            let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
            strftime_utc(&fmt, secs)
        });
        env.add_filter("tojson", tojson);
        // Jinja2: None is not iterable (minijinja iterates it as empty), Undefined is.
        env.add_test("iterable", |v: &Value| !v.is_none() && (v.is_undefined() || v.try_iter().is_ok()));
        env.add_template_owned(NAME, neutralize_generation_tags(source)).map_err(template_err)?;
        Ok(ChatTemplate { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// Renders the conversation; with `add_generation_prompt` the text ends where the
    /// assistant's reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template(NAME).map_err(template_err)?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            tools => Value::from(()),
        })
        .map_err(template_err)
    }
}

/// HF's `AssistantTracker` extension adds `{% generation %}…{% endgeneration %}`, which only
/// marks the assistant's tokens and renders its body unchanged. minijinja has no custom tags,
/// so they become `{% if true %}…{% endif %}`, keeping any `-` whitespace control.
fn neutralize_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(p) = rest.find("{%") {
        out.push_str(&rest[..p]);
        let tag = &rest[p..];
        let Some(end) = tag.find("%}") else { break };
        let inner = &tag[2..end];
        let (lead, body) = inner.strip_prefix('-').map_or(("", inner), |b| ("-", b));
        let (body, trail) = body.strip_suffix('-').map_or((body, ""), |b| (b, "-"));
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => out.push_str(&format!("{{%{lead} {r} {trail}%}}")),
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// `tojson(indent=None, separators=None, sort_keys=False)` formatted as Python's `json.dumps`
/// with `ensure_ascii=False`: `", "` and `": "` separators (`","` between items when
/// indenting), keys in insertion order unless `sort_keys`.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "separators must be a pair")),
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let fmt = JsonFmt { indent, item_sep, key_sep, sort_keys: sort_keys.unwrap_or(false) };
    let mut out = String::new();
    fmt.write(value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonFmt {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl JsonFmt {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    }

    fn write(&self, v: &Value, level: usize, out: &mut String) -> std::result::Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                let s = serde_json::to_string(v)
                    .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
                out.push_str(&s);
            }
            ValueKind::String => write_json_str(v.as_str().unwrap_or(""), out),
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    match k.as_str() {
                        Some(s) => write_json_str(s, out),
                        None => write_json_str(&k.to_string(), out),
                    }
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(k)?, level + 1, out)?;
                }
                self.newline(level, out);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push(']');
            }
            _ => write_json_str(&v.to_string(), out),
        }
        Ok(())
    }
}

fn write_json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31) (Howard Hinnant's civil_from_days).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + (m <= 2) as i64, m, d)
}

/// (year, month, day) to days since 1970-01-01 (Howard Hinnant's days_from_civil).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

const MONTHS: [&str; 12] = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// A subset of C `strftime` for a UTC timestamp: %Y %y %m %d %e %H %I %M %S %p %b %B %h %a %A
/// %j %F %T %%, and glibc's `%-d`-style padding removal. Unknown directives are kept as is.
fn strftime_utc(fmt: &str, secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (rem / 3600, rem / 60 % 60, rem % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let num = |v: i64, w: usize| if no_pad { v.to_string() } else { format!("{v:0w$}") };
        let h12 = if hh % 12 == 0 { 12 } else { hh % 12 };
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&num(y.rem_euclid(100), 2)),
            Some('m') => out.push_str(&num(m as i64, 2)),
            Some('d') => out.push_str(&num(d as i64, 2)),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('H') => out.push_str(&num(hh, 2)),
            Some('I') => out.push_str(&num(h12, 2)),
            Some('M') => out.push_str(&num(mm, 2)),
            Some('S') => out.push_str(&num(ss, 2)),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('b') | Some('h') => out.push_str(&MONTHS[m as usize - 1][..3]),
            Some('B') => out.push_str(MONTHS[m as usize - 1]),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('F') => out.push_str(&format!("{y}-{m:02}-{d:02}")),
            Some('T') => out.push_str(&format!("{hh:02}:{mm:02}:{ss:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + \
        message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}\
        {{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let msgs = [ChatMessage::new("user", "Hi")];
        assert_eq!(t.render(&msgs, true).unwrap(), "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(t.render(&msgs, false).unwrap(), "<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn syntax_errors_and_raise_exception_are_errors() {
        assert!(matches!(ChatTemplate::new("{% for x in %}", "", ""), Err(Error::ChatTemplate(_))));
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        match t.render(&[], false) {
            Err(Error::ChatTemplate(m)) => assert!(m.contains("roles must alternate"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn trims_blocks_like_hf_and_has_python_methods() {
        let src = "{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content.strip().upper() }}]\n  \
                   {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        assert_eq!(t.render(&[ChatMessage::new("user", "  hi ")], false).unwrap(), "[HI]\n");
        let src = "{{ bos_token }}{% if tools is none %}no tools{% endif %}{{ eos_token }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "<s>no tools</s>");
    }

    #[test]
    fn generation_tags_render_their_body() {
        let src = "{% for m in messages %}{%- generation -%} [{{ m.content }}] {%- endgeneration %}{% endfor %}";
        assert_eq!(
            neutralize_generation_tags(src),
            "{% for m in messages %}{%- if true -%} [{{ m.content }}] {%- endif %}{% endfor %}"
        );
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.render(&[ChatMessage::new("assistant", "ok")], false).unwrap(), "[ok]");
    }

    #[test]
    fn none_is_not_iterable() {
        let src = "{{ tools is iterable }} {{ messages is iterable }} {{ 'x' is iterable }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "False True True");
    }

    #[test]
    fn tojson_formats_like_python() {
        let t = ChatTemplate::new("{{ messages[0] | tojson }}|{{ [1, 2.5, none, true] | tojson(indent=2) }}", "", "")
            .unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", "a\"b\n<é>")], false).unwrap(),
            "{\"role\": \"user\", \"content\": \"a\\\"b\\n<é>\"}|[\n  1,\n  2.5,\n  null,\n  true\n]"
        );
    }

    #[test]
    fn strftime_formats_utc() {
        // 2024-07-26 13:05:09 UTC, a Friday, day 208.
        let t = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(
            strftime_utc("%d %b %Y %H:%M:%S %A %j %-d %B %y %%", t),
            "26 Jul 2024 13:05:09 Friday 208 26 July 24 %"
        );
        assert_eq!(strftime_utc("%F %T %a", 0), "1970-01-01 00:00:00 Thu");
        assert_eq!(strftime_utc("%j", 951_782_400), "060"); // 2000-02-29
    }
}

//! Chat templates: the model's Jinja template through minijinja, set up as Hugging Face
//! `transformers` sets up Jinja2 (trim_blocks, lstrip_blocks, loop controls, Python
//! string methods, `raise_exception`). Models without a template get ChatML.
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: serde_json::Value,
}

/// ChatML, the fallback when a model ships no template.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

pub struct ChatTemplate {
    env: Environment<'static>,
    pub bos_token: String,
    pub eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: Option<&str>, bos_token: String, eos_token: String) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build();
        env.set_syntax(syntax.map_err(|e| e.to_string())?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.unwrap_or(CHATML).to_string())
            .map_err(|e| format!("the model's chat template does not parse: {e}"))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
        let t = self.env.get_template("chat").map_err(|e| e.to_string())?;
        t.render(minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| format!("the chat template failed: {}", describe(&e)))
    }
}

fn describe(e: &Error) -> String {
    match e.detail() {
        Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_string(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> Vec<Message> {
        vec![
            Message {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            Message {
                role: "user".into(),
                content: "Hi".into(),
            },
        ]
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::new(None, String::new(), String::new()).unwrap();
        assert_eq!(
            t.render(&msgs(), true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn llama3_style_template_with_pycompat_and_raise() {
        let src = "{{- bos_token }}{%- for message in messages %}{%- if message['role'] not in ['system','user','assistant'] %}{{ raise_exception('bad role ' + message['role']) }}{%- endif %}\
            {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}\
            {%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}";
        let t = ChatTemplate::new(Some(src), "<|begin_of_text|>".into(), "<|eot_id|>".into()).unwrap();
        let out = t.render(&msgs(), true).unwrap();
        assert!(
            out.starts_with("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"),
            "{out}"
        );
        assert!(out.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
        let bad = vec![Message {
            role: "tool".into(),
            content: "x".into(),
        }];
        let e = t.render(&bad, true).unwrap_err();
        assert!(e.contains("bad role tool"), "{e}");
        // Python string methods (pycompat) and loop controls.
        let t2 = ChatTemplate::new(
            Some("{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.content.strip().upper() }}{% endfor %}"),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(t2.render(&msgs(), false).unwrap(), "HI");
    }
}

//! The BERT family's checkpoints: which tensor names a BERT, RoBERTa or DistilBERT
//! checkpoint uses and how its position table is numbered. One description, read by every
//! device's encoder, so that a family added here runs everywhere.
//!
//! - BERT (MiniLM too) and RoBERTa share `modeling_bert.py`'s names; RoBERTa's position
//!   table has [`ModelConfig::position_offset`] rows (`pad_token_id + 1`) before position 0.
//! - DistilBERT names its layers `transformer.layer.N` with `q_lin`/`k_lin`/`v_lin`/
//!   `out_lin`, `sa_layer_norm`, `ffn.lin1`/`lin2` and `output_layer_norm`, and has no
//!   token types.
//!
//! Names are given without `.weight`/`.bias`; [`EncoderNames::candidates`] adds the
//! prefix a checkpoint saved from a task model (`BertFor*`, `RobertaFor*`, ...) has.

use crate::model::config::{Arch, ModelConfig};

/// A layer's tensors (each a Linear or a LayerNorm with `.weight` and `.bias`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderLayerNames {
    pub query: String,
    pub key: String,
    pub value: String,
    pub attention_output: String,
    pub attention_norm: String,
    pub intermediate: String,
    pub output: String,
    pub output_norm: String,
}

/// The names of one family's checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderNames {
    arch: Arch,
}

impl EncoderNames {
    /// The names of `config`'s family; `None` for a decoder.
    pub fn of(config: &ModelConfig) -> Option<Self> {
        config
            .arch
            .is_encoder()
            .then_some(Self { arch: config.arch })
    }

    /// `name` (+ `suffix`) as stored by the bare model and by a task model.
    pub fn candidates(&self, name: &str, suffix: &str) -> Vec<String> {
        let prefix = match self.arch {
            Arch::Roberta => "roberta.",
            Arch::DistilBert => "distilbert.",
            _ => "bert.",
        };
        vec![format!("{name}{suffix}"), format!("{prefix}{name}{suffix}")]
    }

    pub fn word_embeddings(&self) -> &'static str {
        "embeddings.word_embeddings"
    }

    /// The position table: `max_position_embeddings + position_offset` rows, position
    /// `p` at row `position_offset + p`.
    pub fn position_embeddings(&self) -> &'static str {
        "embeddings.position_embeddings"
    }

    /// The token-type table (type 0 is added to every token); `None`: the family has none.
    pub fn token_type_embeddings(&self) -> Option<&'static str> {
        (self.arch != Arch::DistilBert).then_some("embeddings.token_type_embeddings")
    }

    /// The LayerNorm after the embeddings.
    pub fn embeddings_norm(&self) -> &'static str {
        "embeddings.LayerNorm"
    }

    pub fn layer(&self, l: usize) -> EncoderLayerNames {
        if self.arch == Arch::DistilBert {
            let p = format!("transformer.layer.{l}");
            return EncoderLayerNames {
                query: format!("{p}.attention.q_lin"),
                key: format!("{p}.attention.k_lin"),
                value: format!("{p}.attention.v_lin"),
                attention_output: format!("{p}.attention.out_lin"),
                attention_norm: format!("{p}.sa_layer_norm"),
                intermediate: format!("{p}.ffn.lin1"),
                output: format!("{p}.ffn.lin2"),
                output_norm: format!("{p}.output_layer_norm"),
            };
        }
        let p = format!("encoder.layer.{l}");
        EncoderLayerNames {
            query: format!("{p}.attention.self.query"),
            key: format!("{p}.attention.self.key"),
            value: format!("{p}.attention.self.value"),
            attention_output: format!("{p}.attention.output.dense"),
            attention_norm: format!("{p}.attention.output.LayerNorm"),
            intermediate: format!("{p}.intermediate.dense"),
            output: format!("{p}.output.dense"),
            output_norm: format!("{p}.output.LayerNorm"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(model_type: &str, extra: &str) -> ModelConfig {
        ModelConfig::from_json(&format!(
            r#"{{"model_type":"{model_type}","vocab_size":30,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"max_position_embeddings":20{extra}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn bert_and_roberta_share_names_and_differ_in_prefix_and_positions() {
        let bert = config("bert", "");
        let roberta = config("roberta", r#","pad_token_id":1,"type_vocab_size":1"#);
        let (b, r) = (
            EncoderNames::of(&bert).unwrap(),
            EncoderNames::of(&roberta).unwrap(),
        );
        assert_eq!(b.layer(3), r.layer(3));
        assert_eq!(
            r.candidates("embeddings.LayerNorm", ".weight"),
            [
                "embeddings.LayerNorm.weight",
                "roberta.embeddings.LayerNorm.weight"
            ]
        );
        assert_eq!(b.candidates("x", ".bias")[1], "bert.x.bias");
        assert_eq!(
            (bert.position_offset, bert.max_position_embeddings),
            (0, 20)
        );
        // 20 stored rows, the first two before position 0
        assert_eq!(
            (roberta.position_offset, roberta.max_position_embeddings),
            (2, 18)
        );
        assert_eq!((bert.type_vocab_size, roberta.type_vocab_size), (2, 1));
        assert_eq!(r.token_type_embeddings(), b.token_type_embeddings());
    }

    #[test]
    fn distilbert_reads_its_own_config_and_names() {
        let c = ModelConfig::from_json(
            r#"{"model_type":"distilbert","vocab_size":30,"dim":8,"hidden_dim":16,"n_layers":2,"n_heads":2,"max_position_embeddings":20,"activation":"gelu","sinusoidal_pos_embds":false}"#,
        )
        .unwrap();
        assert_eq!(
            (
                c.hidden_size,
                c.intermediate_size,
                c.num_hidden_layers,
                c.num_attention_heads
            ),
            (8, 16, 2, 2)
        );
        assert_eq!((c.type_vocab_size, c.position_offset), (0, 0));
        assert_eq!(c.norm_eps, 1e-12);
        assert_eq!(c.default_task, crate::model_api::Task::Embed);
        let n = EncoderNames::of(&c).unwrap();
        assert_eq!(n.token_type_embeddings(), None);
        assert_eq!(
            n.layer(1).attention_norm,
            "transformer.layer.1.sa_layer_norm"
        );
        assert_eq!(n.layer(0).output, "transformer.layer.0.ffn.lin2");
        assert_eq!(
            n.candidates(n.word_embeddings(), ".weight")[1],
            "distilbert.embeddings.word_embeddings.weight"
        );
        assert!(EncoderNames::of(&config("qwen3", "")).is_none());
    }

    /// The presets count what transformers counts for the bare encoders (no pooler):
    /// BertModel 109,482,240 less its 590,592-weight pooler, RobertaModel 124,645,632 less
    /// the same, DistilBertModel 66,362,880 (it has none).
    #[test]
    fn encoder_presets_have_the_published_sizes() {
        let n = |p: &str| ModelConfig::from_preset(p).unwrap().num_parameters();
        assert_eq!(n("bert-base-uncased"), 109_482_240 - 590_592);
        assert_eq!(n("roberta-base"), 124_645_632 - 590_592);
        assert_eq!(n("distilbert-base-uncased"), 66_362_880);
        // all-MiniLM-L6-v2: 22,713,216 with its 384 x 384 + 384 pooler
        assert_eq!(n("all-minilm-l6-v2"), 22_713_216 - 147_840);
    }

    /// The fixtures' config.json read as the tiny presets (made by
    /// scripts/gpu/make-encoder-fixtures.py), dtype and EOS aside.
    #[test]
    fn the_tiny_presets_are_the_fixtures() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata");
        for name in ["bert-tiny", "roberta-tiny", "distilbert-tiny"] {
            let file = ModelConfig::from_file(&root.join(name).join("config.json")).unwrap();
            let mut preset = ModelConfig::from_preset(name).unwrap();
            preset.eos_token_ids = file.eos_token_ids.clone();
            preset.tie_word_embeddings = file.tie_word_embeddings;
            assert_eq!(file, preset, "{name}");
        }
    }

    #[test]
    fn unsupported_encoder_configs_name_the_field() {
        let e = ModelConfig::from_json(
            r#"{"model_type":"distilbert","vocab_size":30,"dim":8,"hidden_dim":16,"n_layers":2,"n_heads":2,"max_position_embeddings":20,"sinusoidal_pos_embds":true}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("sinusoidal_pos_embds"), "{e}");
        let e = ModelConfig::from_json(
            r#"{"model_type":"roberta","vocab_size":30,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"max_position_embeddings":2,"pad_token_id":1}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("max_position_embeddings 2"), "{e}");
        let e = ModelConfig::from_json(
            r#"{"model_type":"roberta","vocab_size":30,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"max_position_embeddings":20,"hidden_act":"relu"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("relu"), "{e}");
    }
}

//! A word-level tokenizer built from a dataset's captions, for text encoders trained from
//! scratch (the shipped default model uses one).
//!
//! It is a plain `tokenizer.json` (Hugging Face tokenizers' WordLevel model: NFKC + lowercase,
//! split on whitespace and punctuation, BOS/EOS around the words) with a `tokenizer_config.json`,
//! so sd-rs, transformers and diffusers all load it. Words absent from the vocabulary become
//! `<unk>` and are reported by the prompt tokenizer.
use anyhow::Result;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

pub const PAD: &str = "<pad>";
pub const UNK: &str = "<unk>";
pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";

/// The pieces the `Whitespace` pre-tokenizer makes: runs of word characters, or runs of other
/// non-space characters (its regex is `\w+|[^\w\s]+`), lowercased.
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut current_is_word = false;
    for c in text.to_lowercase().chars() {
        if c.is_whitespace() {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
            continue;
        }
        let is_word = c.is_alphanumeric() || c == '_';
        if !current.is_empty() && is_word != current_is_word {
            out.push(std::mem::take(&mut current));
        }
        current_is_word = is_word;
        current.push(c);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The vocabulary of `captions`: special tokens first, then words by falling frequency (ties
/// alphabetical), so the same captions always give the same ids.
pub fn build_vocab<'a>(captions: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for caption in captions {
        for w in words(caption) {
            *counts.entry(w).or_default() += 1;
        }
    }
    let mut by_count: Vec<(String, usize)> = counts.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    [PAD, UNK, BOS, EOS]
        .iter()
        .map(|s| s.to_string())
        .chain(by_count.into_iter().map(|(w, _)| w))
        .collect()
}

/// Writes `tokenizer.json` and `tokenizer_config.json` for `vocab` into `dir`.
pub fn write_word_tokenizer(dir: &Path, vocab: &[String], max_length: usize) -> Result<()> {
    let ids: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), json!(i)))
        .collect();
    let added: Vec<Value> = [PAD, UNK, BOS, EOS]
        .iter()
        .map(|t| {
            json!({"id": ids[*t], "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let special = |t: &str| json!({"id": t, "ids": [ids[t]], "tokens": [t]});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": EOS, "type_id": 0}}
            ],
            "pair": [
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {BOS: special(BOS), EOS: special(EOS)}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": ids, "unk_token": UNK}
    });
    let config = json!({
        "backend": "tokenizers",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "model_max_length": max_length
    });
    std::fs::create_dir_all(dir)?;
    crate::io::write_atomic(
        &dir.join("tokenizer.json"),
        serde_json::to_string_pretty(&tokenizer)?.as_bytes(),
    )?;
    crate::io::write_atomic(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::PromptTokenizer;

    #[test]
    fn words_split_like_the_whitespace_pre_tokenizer() {
        assert_eq!(
            words("Anime girl, red-hair!! x2"),
            vec!["anime", "girl", ",", "red", "-", "hair", "!!", "x2"]
        );
    }

    #[test]
    fn built_tokenizer_round_trips_through_the_prompt_tokenizer() {
        let captions = ["anime girl, red hair", "anime girl, blue hair, glasses"];
        let vocab = build_vocab(captions.iter().copied());
        // Frequency order: "anime", "girl", "hair", "," appear twice ("," first alphabetically).
        assert_eq!(
            &vocab[..8],
            &[PAD, UNK, BOS, EOS, ",", "anime", "girl", "hair"]
        );
        let dir = std::env::temp_dir().join(format!("sdrs-vocab-{}", std::process::id()));
        write_word_tokenizer(&dir, &vocab, 16).unwrap();
        let tok = PromptTokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.max_length(), 16);
        let t = tok.tokenize("Anime girl, RED hair, purple eyes").unwrap();
        let id = |w: &str| vocab.iter().position(|v| v == w).unwrap() as u32;
        assert_eq!(
            &t.chunks[0][..9],
            &[
                id(BOS),
                id("anime"),
                id("girl"),
                id(","),
                id("red"),
                id("hair"),
                id(","),
                id(UNK),
                id(UNK)
            ]
        );
        assert_eq!(t.unknown_words, vec!["purple", "eyes"]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

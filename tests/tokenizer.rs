//! Prompt tokenization against transformers 5.23 (ids recorded by
//! scripts/make_text_fixtures.py): diffusers' padded/truncated ids, AUTOMATIC1111-style chunks
//! for long prompts, and unknown-word reporting for the word-level tokenizer.

use anyhow::Result;
use candle_core::{Device, Tensor};
use sd_rs::model::tokenizer::{ids_tensor, PromptTokenizer};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/text")
        .join(path)
}

fn expected(path: &str) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(fixture(path), &Device::Cpu)?)
}

fn rows(t: &Tensor) -> Result<Vec<Vec<u32>>> {
    let t = if t.rank() == 1 {
        t.unsqueeze(0)?
    } else {
        t.clone()
    };
    Ok(t.to_vec2::<i64>()?
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect())
}

fn string_list(path: &str, key: Option<&str>) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(path))?)?;
    let list = match key {
        Some(k) => v[k].clone(),
        None => v,
    };
    Ok(list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect())
}

/// Every recorded prompt: the truncated ids equal diffusers', the chunks equal the A1111 chunks.
fn check_clip_tokenizer(dir: &str, expected_file: &str, prefix: &str) -> Result<()> {
    let tok = PromptTokenizer::from_dir(fixture(dir))?;
    let e = expected(expected_file)?;
    let prompts = string_list("prompts.json", Some("tokenizer_prompts"))?;
    assert_eq!(tok.max_length(), 77);
    assert_eq!(tok.tokens_per_chunk(), 75);
    for (i, p) in prompts.iter().enumerate() {
        let want_ids = rows(&e[&format!("{prefix}prompt{i}.ids")])?;
        let want_chunks = rows(&e[&format!("{prefix}prompt{i}.chunks")])?;
        let truncated = tok.tokenize_truncated(p)?;
        assert_eq!(truncated.chunks, want_ids, "{dir}: ids of {p:?}");
        let chunked = tok.tokenize(p)?;
        assert_eq!(chunked.chunks, want_chunks, "{dir}: chunks of {p:?}");
        assert_eq!(truncated.n_truncated, truncated.n_tokens.saturating_sub(75));
        println!(
            "{dir}: prompt {i}: {} tokens, {} chunk(s), {} truncated by diffusers",
            chunked.n_tokens,
            chunked.chunks.len(),
            truncated.n_truncated
        );
    }
    Ok(())
}

#[test]
fn clip_bpe_from_vocab_and_merges_matches_transformers() -> Result<()> {
    // SD 1.x layout: vocab.json + merges.txt, AddedToken dicts in tokenizer_config.json.
    assert!(!fixture("clip_l/tokenizer/tokenizer.json").exists());
    check_clip_tokenizer("clip_l/tokenizer", "clip_l/expected.safetensors", "tok.")
}

#[test]
fn clip_bpe_tokenizer_json_with_bang_padding_matches_transformers() -> Result<()> {
    // SD 2.x: tokenizer.json, pad token "!" (id 0), which is also kept whole inside prompts.
    let tok = PromptTokenizer::from_dir(fixture("openclip_h/tokenizer"))?;
    assert_eq!(tok.pad_id(), 0);
    check_clip_tokenizer(
        "openclip_h/tokenizer",
        "openclip_h/expected.safetensors",
        "tok.",
    )?;
    check_clip_tokenizer("sdxl/tokenizer_2", "sdxl/expected.safetensors", "tok2.")
}

#[test]
fn long_prompt_is_chunked_not_cut() -> Result<()> {
    let tok = PromptTokenizer::from_dir(fixture("clip_l/tokenizer"))?;
    let long = &string_list("prompts.json", Some("tokenizer_prompts"))?[6];
    let t = tok.tokenize(long)?;
    assert!(
        t.n_tokens > 75,
        "the fixture's long prompt must exceed one chunk"
    );
    assert_eq!(t.chunks.len(), t.n_tokens.div_ceil(75));
    let (bos, eos, pad) = (tok.bos_id().unwrap(), tok.eos_id().unwrap(), tok.pad_id());
    let mut content = Vec::new();
    for c in &t.chunks {
        assert_eq!(c.len(), 77);
        assert_eq!(c[0], bos);
        let end = c.iter().position(|&id| id == eos).unwrap();
        assert!(c[end..].iter().all(|&id| id == eos || id == pad));
        content.extend_from_slice(&c[1..end]);
    }
    // The chunks hold every token of the prompt, in order.
    assert_eq!(content, tok.encode_tokens(long)?.0);
    assert_eq!(tok.tokenize_truncated(long)?.n_truncated, t.n_tokens - 75);

    // The negative prompt is padded with empty-prompt chunks to the same count.
    let mut batch = vec![t.clone(), tok.tokenize("lowres")?];
    tok.equalize_chunks(&mut batch);
    assert_eq!(batch[1].chunks.len(), t.chunks.len());
    assert_eq!(batch[1].chunks[1], tok.empty_chunk());
    assert_eq!(tok.empty_chunk()[..3], [bos, eos, pad]);
    let ids = ids_tensor(&batch, &Device::Cpu)?;
    assert_eq!(ids.dims(), &[2, t.chunks.len(), 77]);
    let unequal = [t, tok.tokenize("lowres")?];
    assert!(ids_tensor(&unequal, &Device::Cpu).is_err());
    Ok(())
}

#[test]
fn unknown_bytes_are_reported_for_bpe() -> Result<()> {
    // The fixture vocabulary has only printable ASCII: the other characters become <|endoftext|>
    // (CLIP's unk token). A literal "<|endoftext|>" in the prompt is not an unknown word.
    let tok = PromptTokenizer::from_dir(fixture("clip_l/tokenizer"))?;
    let prompts = string_list("prompts.json", Some("tokenizer_prompts"))?;
    let t = tok.tokenize(&prompts[4])?;
    assert_eq!(t.unknown_words, ["—", "é", "ï", "日", "本"]);
    assert!(tok.tokenize(&prompts[5])?.unknown_words.is_empty());
    assert!(tok.tokenize(&prompts[0])?.unknown_words.is_empty());
    Ok(())
}

#[test]
fn word_level_matches_transformers_and_reports_unknown_words() -> Result<()> {
    let tok = PromptTokenizer::from_dir(fixture("wordlevel/tokenizer"))?;
    let e = expected("wordlevel/expected.safetensors")?;
    let prompts = string_list("wordlevel/prompts.json", None)?;
    for (i, p) in prompts.iter().enumerate() {
        let t = tok.tokenize_truncated(p)?;
        assert_eq!(
            t.chunks,
            rows(&e[&format!("prompt{i}.ids")])?,
            "ids of {p:?}"
        );
        let t = tok.tokenize(p)?;
        assert_eq!(
            t.chunks,
            rows(&e[&format!("prompt{i}.chunks")])?,
            "chunks of {p:?}"
        );
        println!(
            "wordlevel: {p:?}: {} chunk(s), unknown {:?}",
            t.chunks.len(),
            t.unknown_words
        );
    }
    // Lowercased and split on punctuation, so these are all known.
    assert!(tok.tokenize(&prompts[1])?.unknown_words.is_empty());
    // Reported in the prompt's own spelling, once each.
    let t = tok.tokenize("anime boy, PURPLE hair and golden eyes! purple")?;
    assert_eq!(t.unknown_words, ["PURPLE", "golden", "!", "purple"]);
    assert_eq!(
        tok.tokenize(&prompts[2])?.unknown_words,
        ["purple", "golden", "!"]
    );
    // "girl " * 80 is 80 tokens: two chunks.
    assert_eq!(tok.tokenize(&prompts[4])?.chunks.len(), 2);
    Ok(())
}

#[test]
fn bare_tokenizer_json_uses_clip_style_defaults() -> Result<()> {
    // Without tokenizer_config.json: BOS/EOS <|startoftext|>/<|endoftext|>, pad <pad>, length 77.
    let dir = std::env::temp_dir().join(format!("sd-rs-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("tokenizer.json");
    std::fs::copy(fixture("wordlevel/tokenizer/tokenizer.json"), &path)?;
    let bare = PromptTokenizer::from_file(&path)?;
    let full = PromptTokenizer::from_dir(fixture("wordlevel/tokenizer"))?;
    for p in string_list("wordlevel/prompts.json", None)? {
        assert_eq!(bare.tokenize(&p)?, full.tokenize(&p)?, "{p:?}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let err = PromptTokenizer::from_dir(fixture("clip_l/text_encoder"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("save_pretrained"),
        "{err}"
    );
}

//! Our CLIP text encoders against transformers 5.23 / diffusers 0.42.1 on the tiny random-weight
//! models of tests/fixtures/text (made by scripts/make_text_fixtures.py): token ids from our
//! tokenizer, every output the pipelines use, and AUTOMATIC1111-style chunked long prompts.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sd_rs::model::clip::{ClipTextConfig, ClipTextModel, ContextLayer};
use sd_rs::model::tokenizer::{ids_tensor, PromptTokenizer, TokenizedPrompt};
use std::collections::HashMap;
use std::path::PathBuf;

const TOL: f32 = 1e-4;

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/text")
        .join(path)
}

fn expected(model: &str) -> Result<HashMap<String, Tensor>> {
    let path = fixture(model).join("expected.safetensors");
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

fn get<'a>(e: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    e.get(key)
        .unwrap_or_else(|| panic!("{key} missing from expected.safetensors"))
}

struct Prompts {
    prompts: Vec<String>,
    long_prompt: String,
    negative: String,
}

fn prompts() -> Result<Prompts> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("prompts.json"))?)?;
    let s = |k: &str| v[k].as_str().unwrap().to_string();
    Ok(Prompts {
        prompts: v["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect(),
        long_prompt: s("long_prompt"),
        negative: s("negative"),
    })
}

fn load_encoder(dir: &str) -> Result<ClipTextModel> {
    let dir = fixture(dir);
    let cfg = ClipTextConfig::from_file(dir.join("config.json"))?;
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )?
    };
    ClipTextModel::new(vb, &cfg)
}

/// Asserts shapes match and the max abs difference is within TOL; prints it.
fn assert_close(what: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let diff = (got - want)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    println!("{what:48} max abs diff {diff:.3e} (max |value| {scale:.2})");
    assert!(diff <= TOL, "{what}: max abs diff {diff} > {TOL}");
    Ok(())
}

fn assert_ids(what: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    let got = got.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    let want = want.flatten_all()?.to_vec1::<i64>()?;
    assert_eq!(got, want, "{what}: token ids differ from transformers'");
    Ok(())
}

/// diffusers' tokenization of a batch (one truncated chunk each), as a (B, 77) tensor.
fn diffusers_ids(tok: &PromptTokenizer, prompts: &[String]) -> Result<Tensor> {
    let t: Vec<TokenizedPrompt> = prompts
        .iter()
        .map(|p| tok.tokenize_truncated(p))
        .collect::<Result<_>>()?;
    Ok(ids_tensor(&t, &Device::Cpu)?.squeeze(1)?)
}

/// A1111 chunking of a batch, equalized to the same number of chunks: (B, n, 77).
fn chunked_ids(tok: &PromptTokenizer, prompts: &[&str]) -> Result<Tensor> {
    let mut t: Vec<TokenizedPrompt> = prompts
        .iter()
        .map(|p| tok.tokenize(p))
        .collect::<Result<_>>()?;
    tok.equalize_chunks(&mut t);
    ids_tensor(&t, &Device::Cpu)
}

/// SD 1.x / 2.x: one text encoder, context = last_hidden_state (clip_skip: final norm).
fn check_sd(name: &str) -> Result<()> {
    println!("== {name}");
    let e = expected(name)?;
    let p = prompts()?;
    let tok = PromptTokenizer::from_dir(fixture(name).join("tokenizer"))?;
    let model = load_encoder(&format!("{name}/text_encoder"))?;

    let ids = diffusers_ids(&tok, &p.prompts)?;
    assert_ids("prompt ids", &ids, get(&e, "ids"))?;
    let out = model.forward(&ids)?;
    assert_close(
        "last_hidden_state",
        &out.last_hidden_state,
        get(&e, "last_hidden_state"),
    )?;
    assert_close(
        "hidden_states[0] (embeddings)",
        &out.hidden_states[0],
        get(&e, "hidden_states.0"),
    )?;
    assert_close("pooler_output", &out.pooled, get(&e, "pooled"))?;
    assert!(out.text_embeds.is_none());

    let emb = model.encode(&ids, ContextLayer::Final { clip_skip: 0 })?;
    assert_close(
        "encode_prompt context (= diffusers)",
        &emb.context,
        get(&e, "last_hidden_state"),
    )?;
    let skip1 = model.encode(&ids, ContextLayer::Final { clip_skip: 1 })?;
    assert_close(
        "context clip_skip=1",
        &skip1.context,
        get(&e, "context_clip_skip1"),
    )?;

    let neg = vec![p.negative.clone(), String::new()];
    let neg_ids = diffusers_ids(&tok, &neg)?;
    assert_ids("negative ids", &neg_ids, get(&e, "diffusers.negative_ids"))?;
    let neg_emb = model.encode(&neg_ids, ContextLayer::default())?;
    assert_close(
        "diffusers negative_prompt_embeds",
        &neg_emb.context,
        get(&e, "diffusers.negative_prompt_embeds"),
    )?;

    let chunks = chunked_ids(&tok, &[&p.long_prompt, &p.prompts[0]])?;
    assert_ids(
        "chunked ids (2 prompts x 2 chunks)",
        &chunks,
        get(&e, "chunked.ids"),
    )?;
    let chunked = model.encode(&chunks, ContextLayer::default())?;
    assert_close(
        "chunked context (2, 154, D)",
        &chunked.context,
        get(&e, "chunked.context"),
    )?;
    assert_close(
        "chunked pooled (first chunk)",
        &chunked.pooled,
        get(&e, "chunked.pooled"),
    )?;
    Ok(())
}

#[test]
fn sd1_clip_l_matches_transformers() -> Result<()> {
    // quick_gelu, legacy eos_token_id = 2 (argmax pooling), pads with EOS, vocab.json+merges.txt,
    // weights under `text_model.`.
    check_sd("clip_l")
}

#[test]
fn sd2_openclip_h_matches_transformers() -> Result<()> {
    // gelu, pads with "!" (id 0), tokenizer.json, weights saved by transformers 5 without prefix.
    check_sd("openclip_h")
}

#[test]
fn sdxl_pair_matches_diffusers_encode_prompt() -> Result<()> {
    let e = expected("sdxl")?;
    let p = prompts()?;
    let tok1 = PromptTokenizer::from_dir(fixture("sdxl/tokenizer"))?;
    let tok2 = PromptTokenizer::from_dir(fixture("sdxl/tokenizer_2"))?;
    let te1 = load_encoder("sdxl/text_encoder")?;
    let te2 = load_encoder("sdxl/text_encoder_2")?;
    assert!(!te1.config().with_projection() && te2.config().with_projection());
    assert_eq!(te2.pooled_size(), 16);

    let ids1 = diffusers_ids(&tok1, &p.prompts)?;
    let ids2 = diffusers_ids(&tok2, &p.prompts)?;
    assert_ids("tokenizer ids", &ids1, get(&e, "te1.ids"))?;
    assert_ids("tokenizer_2 ids", &ids2, get(&e, "te2.ids"))?;

    let out1 = te1.forward(&ids1)?;
    let out2 = te2.forward(&ids2)?;
    assert_close(
        "te1 hidden_states[0]",
        &out1.hidden_states[0],
        get(&e, "te1.hidden_states.0"),
    )?;
    assert_close(
        "te1 pooler_output (first eos)",
        &out1.pooled,
        get(&e, "te1.pooled"),
    )?;
    assert_close(
        "te2 last_hidden_state",
        &out2.last_hidden_state,
        get(&e, "te2.last_hidden_state"),
    )?;
    assert_close("te2 pooler_output", &out2.pooled, get(&e, "te2.pooled"))?;
    assert_close(
        "te2 text_embeds",
        out2.text_embeds.as_ref().unwrap(),
        get(&e, "te2.text_embeds"),
    )?;

    // diffusers: concat(te1.hidden_states[-2], te2.hidden_states[-2]) and te2's text_embeds.
    let layer = ContextLayer::Penultimate { clip_skip: 0 };
    let (a, b) = (te1.encode(&ids1, layer)?, te2.encode(&ids2, layer)?);
    let context = Tensor::cat(&[&a.context, &b.context], 2)?;
    assert_close(
        "diffusers prompt_embeds (2, 77, 56)",
        &context,
        get(&e, "diffusers.prompt_embeds"),
    )?;
    assert_close(
        "diffusers pooled_prompt_embeds",
        &b.pooled,
        get(&e, "diffusers.pooled_prompt_embeds"),
    )?;

    let skip = ContextLayer::Penultimate { clip_skip: 1 };
    assert_close(
        "te1 context clip_skip=1",
        &te1.encode(&ids1, skip)?.context,
        get(&e, "te1.context_clip_skip1"),
    )?;
    assert_close(
        "te2 context clip_skip=1",
        &te2.encode(&ids2, skip)?.context,
        get(&e, "te2.context_clip_skip1"),
    )?;

    let neg = vec![p.negative.clone(), String::new()];
    let (n1, n2) = (diffusers_ids(&tok1, &neg)?, diffusers_ids(&tok2, &neg)?);
    assert_ids("negative ids", &n1, get(&e, "diffusers.negative_ids"))?;
    assert_ids("negative ids 2", &n2, get(&e, "diffusers.negative_ids_2"))?;
    let (a, b) = (te1.encode(&n1, layer)?, te2.encode(&n2, layer)?);
    let context = Tensor::cat(&[&a.context, &b.context], 2)?;
    assert_close(
        "diffusers negative_prompt_embeds",
        &context,
        get(&e, "diffusers.negative_prompt_embeds"),
    )?;
    assert_close(
        "diffusers negative_pooled_prompt_embeds",
        &b.pooled,
        get(&e, "diffusers.negative_pooled_prompt_embeds"),
    )?;

    let chunks = chunked_ids(&tok2, &[&p.long_prompt, &p.prompts[0]])?;
    assert_ids("te2 chunked ids", &chunks, get(&e, "te2.chunked.ids"))?;
    let chunked = te2.encode(&chunks, layer)?;
    assert_close(
        "te2 chunked context (2, 154, 24)",
        &chunked.context,
        get(&e, "te2.chunked.context"),
    )?;
    assert_close(
        "te2 chunked text_embeds (first chunk)",
        &chunked.pooled,
        get(&e, "te2.chunked.pooled"),
    )?;
    Ok(())
}

#[test]
fn eos_position_follows_transformers_rules() -> Result<()> {
    let legacy = load_encoder("clip_l/text_encoder")?; // eos_token_id == 2: argmax of the ids
    let current = load_encoder("sdxl/text_encoder")?; // first position of eos_token_id
    let eos = current.config().eos_token_id;
    assert_eq!(legacy.config().eos_token_id, 2);
    let ids = Tensor::new(
        &[[5u32, 9, eos, eos, eos], [eos, 3, 7, eos, 1]],
        &Device::Cpu,
    )?;
    assert_eq!(current.eos_positions(&ids)?, vec![2, 0]);
    // argmax takes the first of equal maxima; a larger id before EOS wins under the legacy rule.
    let ids = Tensor::new(&[[5u32, 9, 7, 9, 1], [0, 3, 2, 1, 1]], &Device::Cpu)?;
    assert_eq!(legacy.eos_positions(&ids)?, vec![1, 1]);
    // No EOS at all: transformers' argmax over all-false gives position 0.
    assert_eq!(current.eos_positions(&ids)?, vec![0, 0]);
    Ok(())
}

#[test]
fn too_long_sequence_and_bad_clip_skip_are_errors() -> Result<()> {
    let model = load_encoder("clip_l/text_encoder")?;
    let ids = Tensor::zeros((1, 78), DType::U32, &Device::Cpu)?;
    let err = model.forward(&ids).unwrap_err().to_string();
    assert!(err.contains("max_position_embeddings 77"), "{err}");
    let ids = Tensor::zeros((1, 77), DType::U32, &Device::Cpu)?;
    // Two layers: hidden_states has 3 entries, so -(2 + 2) does not exist.
    let err = model
        .encode(&ids, ContextLayer::Penultimate { clip_skip: 2 })
        .unwrap_err()
        .to_string();
    assert!(err.contains("only 2 layers"), "{err}");
    Ok(())
}

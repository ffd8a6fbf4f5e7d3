//! Prompt tokenization for the text encoders, loaded from a diffusers `tokenizer/` directory.
//!
//! Two vocabularies go through the same API:
//! - CLIP's byte-level BPE, from `tokenizer.json` or, as in the original SD repositories, from
//!   `vocab.json` + `merges.txt` (we then build the pipeline transformers 5.23's `CLIPTokenizer`
//!   builds, so the ids are the same);
//! - any other `tokenizer.json`, e.g. the small word-level vocabulary of the default model, whose
//!   out-of-vocabulary words are reported in [`TokenizedPrompt::unknown_words`] so the CLI can
//!   warn instead of dropping them silently.
//!
//! A prompt of at most `max_length - 2` tokens is tokenized exactly as diffusers does
//! (`padding="max_length", truncation=True`): `[BOS] tokens [EOS] [PAD]...`. A longer prompt is not
//! cut: like AUTOMATIC1111 it is split into chunks of `max_length - 2` tokens, each wrapped in
//! BOS/EOS and padded, and the text encoder encodes the chunks separately and concatenates them
//! along the sequence axis (see `ClipTextModel::encode`). Unlike AUTOMATIC1111 the chunks break at
//! exact token counts (no backtracking to the last comma).

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::path::Path;
use tokenizers::{AddedToken, ModelWrapper, Tokenizer};

/// CLIP's default context length, used when `tokenizer_config.json` does not give one.
pub const DEFAULT_MAX_LENGTH: usize = 77;

/// transformers' `CLIPTokenizer` pre-tokenizer regex (the special tokens first, so that typing
/// them keeps them whole).
const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A prompt turned into fixed-length windows of token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// At least one chunk; each exactly `max_length` ids: `[BOS] tokens [EOS] [PAD]...`.
    pub chunks: Vec<Vec<u32>>,
    /// Number of prompt tokens (without BOS/EOS/padding), before any truncation.
    pub n_tokens: usize,
    /// Prompt tokens dropped by [`PromptTokenizer::tokenize_truncated`] (0 when chunking).
    pub n_truncated: usize,
    /// Pieces of the prompt the vocabulary does not know (they became the unknown token), in
    /// order of first appearance, each listed once.
    pub unknown_words: Vec<String>,
}

/// The tokenizer of one text encoder, with its special tokens and context length.
#[derive(Debug, Clone)]
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: u32,
    unk: Option<(String, u32)>,
}

/// Special tokens and length as `tokenizer_config.json` / `special_tokens_map.json` give them.
#[derive(Debug, Default)]
struct SpecialTokens {
    bos: Option<String>,
    eos: Option<String>,
    pad: Option<String>,
    unk: Option<String>,
    max_length: Option<usize>,
}

/// A special token is either `"<|endoftext|>"` or `{"content": "<|endoftext|>", ...}`.
fn token_content(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(value))
}

impl SpecialTokens {
    /// `tokenizer_config.json` wins over `special_tokens_map.json`, as in transformers.
    fn from_dir(dir: &Path) -> Result<Self> {
        let mut out = Self::default();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let Some(v) = read_json(&dir.join(name))? else {
                continue;
            };
            out.bos = out.bos.or_else(|| token_content(v.get("bos_token")));
            out.eos = out.eos.or_else(|| token_content(v.get("eos_token")));
            out.pad = out.pad.or_else(|| token_content(v.get("pad_token")));
            out.unk = out.unk.or_else(|| token_content(v.get("unk_token")));
            // transformers writes a huge sentinel (1e30) for "no limit": ignore it.
            let len = v.get("model_max_length").and_then(Value::as_f64);
            if let Some(len) = len.filter(|l| (1.0..1e9).contains(l)) {
                out.max_length = out.max_length.or(Some(len as usize));
            }
        }
        Ok(out)
    }
}

/// The `tokenizer.json` transformers' `CLIPTokenizer` would build from `vocab.json` +
/// `merges.txt` (without post-processor and decoder: we add BOS/EOS per chunk ourselves).
fn clip_bpe_from_vocab_merges(
    vocab_path: &Path,
    merges_path: &Path,
    unk: &str,
) -> Result<Tokenizer> {
    let vocab =
        read_json(vocab_path)?.ok_or_else(|| anyhow!("{} missing", vocab_path.display()))?;
    let merges_text = std::fs::read_to_string(merges_path)
        .with_context(|| format!("reading {}", merges_path.display()))?;
    let mut merges = Vec::new();
    for (i, line) in merges_text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push(json!([a, b])),
            _ => bail!(
                "{}:{}: a merge is two tokens separated by one space, got {line:?}",
                merges_path.display(),
                i + 1
            ),
        }
    }
    let spec = json!({
        "version": "1.0",
        "added_tokens": [],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT_REGEX}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": null,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk,
            "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    });
    spec.to_string().parse::<Tokenizer>().map_err(|e| {
        anyhow!(
            "building the CLIP BPE tokenizer from {}: {e}",
            vocab_path.display()
        )
    })
}

impl PromptTokenizer {
    /// Loads a diffusers `tokenizer/` (or `tokenizer_2/`) directory: `tokenizer.json`, else
    /// `vocab.json` + `merges.txt` (CLIP BPE); special tokens and `model_max_length` from
    /// `tokenizer_config.json` / `special_tokens_map.json` when present.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let specials = SpecialTokens::from_dir(dir)?;
        let json_path = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let tokenizer = if json_path.exists() {
            Tokenizer::from_file(&json_path)
                .map_err(|e| anyhow!("loading tokenizer {}: {e}", json_path.display()))?
        } else if vocab.exists() && merges.exists() {
            let unk = specials.unk.as_deref().unwrap_or("<|endoftext|>");
            let mut tok = clip_bpe_from_vocab_merges(&vocab, &merges, unk)?;
            // transformers registers the configured special tokens as added tokens, which keeps
            // them whole when they appear in a prompt (SD 2.x's pad token "!" included).
            let mut added: Vec<String> = Vec::new();
            let defaults = [
                specials.unk.clone().or(Some("<|endoftext|>".into())),
                specials.bos.clone().or(Some("<|startoftext|>".into())),
                specials.eos.clone().or(Some("<|endoftext|>".into())),
                specials.pad.clone().or(Some("<|endoftext|>".into())),
            ];
            for t in defaults.into_iter().flatten() {
                if !added.contains(&t) {
                    added.push(t);
                }
            }
            tok.add_special_tokens(added.iter().map(|t| AddedToken::from(t.clone(), true)))
                .map_err(|e| anyhow!("adding special tokens to {}: {e}", vocab.display()))?;
            tok
        } else {
            bail!(
                "no tokenizer in {dir}: expected tokenizer.json, or vocab.json + merges.txt (CLIP). \
                 To convert another tokenizer, run in Python: \
                 `from transformers import AutoTokenizer; AutoTokenizer.from_pretrained(\"{dir}\").save_pretrained(\"{dir}\")`",
                dir = dir.display()
            )
        };
        Self::new(tokenizer, specials)
            .with_context(|| format!("setting up the tokenizer in {}", dir.display()))
    }

    /// Loads a bare `tokenizer.json`. Without a `tokenizer_config.json` next to it the special
    /// tokens are CLIP's (`<|startoftext|>`, `<|endoftext|>`) if the vocabulary has them, the pad
    /// token is `<pad>` if present or else the EOS token, and the length is 77.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("loading tokenizer {}: {e}", path.display()))?;
        let specials = match path.parent() {
            Some(dir) => SpecialTokens::from_dir(dir)?,
            None => SpecialTokens::default(),
        };
        Self::new(tokenizer, specials)
            .with_context(|| format!("setting up the tokenizer {}", path.display()))
    }

    fn new(mut tokenizer: Tokenizer, specials: SpecialTokens) -> Result<Self> {
        // transformers stores its last padding/truncation call in tokenizer.json; we pad and
        // chunk ourselves (and encode without the post-processor's BOS/EOS).
        tokenizer
            .with_truncation(None)
            .map_err(|e| anyhow!("disabling truncation: {e}"))?;
        tokenizer.with_padding(None);

        let id_of = |role: &str, name: &str| -> Result<u32> {
            tokenizer
                .token_to_id(name)
                .ok_or_else(|| anyhow!("{role} token {name:?} is not in the vocabulary"))
        };
        let known = |name: &str| tokenizer.token_to_id(name).map(|_| name.to_string());
        let bos = specials.bos.or_else(|| known("<|startoftext|>"));
        let eos = specials.eos.or_else(|| known("<|endoftext|>"));
        let pad = specials
            .pad
            .or_else(|| known("<pad>"))
            .or_else(|| eos.clone())
            .ok_or_else(|| anyhow!("no pad token: set pad_token in tokenizer_config.json"))?;
        let model_unk = match tokenizer.get_model() {
            ModelWrapper::BPE(m) => m.get_unk_token().clone(),
            ModelWrapper::WordLevel(m) => Some(m.unk_token.clone()),
            // WordPiece and Unigram keep it private: set unk_token in tokenizer_config.json.
            ModelWrapper::WordPiece(_) | ModelWrapper::Unigram(_) => None,
        };
        let unk = specials
            .unk
            .or(model_unk)
            .and_then(|name| tokenizer.token_to_id(&name).map(|id| (name, id)));

        let bos_id = bos.map(|t| id_of("BOS", &t)).transpose()?;
        let eos_id = eos.map(|t| id_of("EOS", &t)).transpose()?;
        let pad_id = id_of("pad", &pad)?;
        let max_length = specials.max_length.unwrap_or(DEFAULT_MAX_LENGTH);
        let n_special = bos_id.is_some() as usize + eos_id.is_some() as usize;
        if max_length <= n_special {
            bail!("model_max_length {max_length} leaves no room for prompt tokens");
        }
        Ok(Self {
            tokenizer,
            max_length,
            bos_id,
            eos_id,
            pad_id,
            unk,
        })
    }

    /// Length of every chunk (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Prompt tokens per chunk: `max_length` minus BOS and EOS (75 for CLIP).
    pub fn tokens_per_chunk(&self) -> usize {
        self.max_length - self.bos_id.is_some() as usize - self.eos_id.is_some() as usize
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Number of ids in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The prompt's token ids without BOS/EOS, plus the pieces that became the unknown token.
    pub fn encode_tokens(&self, prompt: &str) -> Result<(Vec<u32>, Vec<String>)> {
        let enc = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| anyhow!("tokenizing {prompt:?}: {e}"))?;
        let ids = enc.get_ids().to_vec();
        let mut unknown: Vec<String> = Vec::new();
        if let Some((unk_name, unk_id)) = &self.unk {
            for (&id, &(start, end)) in ids.iter().zip(enc.get_offsets()) {
                let piece = prompt.get(start..end).unwrap_or("").to_string();
                // The unknown token typed literally (CLIP's is also its EOS) is not unknown.
                if id == *unk_id && piece != *unk_name && !unknown.contains(&piece) {
                    unknown.push(piece);
                }
            }
        }
        Ok((ids, unknown))
    }

    /// One chunk: `[BOS] tokens [EOS]` padded to `max_length` with the pad token.
    fn wrap(&self, tokens: &[u32]) -> Vec<u32> {
        let mut chunk = Vec::with_capacity(self.max_length);
        chunk.extend(self.bos_id);
        chunk.extend_from_slice(tokens);
        chunk.extend(self.eos_id);
        chunk.resize(self.max_length, self.pad_id);
        chunk
    }

    /// The chunk of an empty prompt, used to pad a prompt to more chunks.
    pub fn empty_chunk(&self) -> Vec<u32> {
        self.wrap(&[])
    }

    /// Tokenizes a prompt into as many chunks as it needs (one for up to
    /// [`tokens_per_chunk`](Self::tokens_per_chunk) tokens, identical to diffusers' ids).
    pub fn tokenize(&self, prompt: &str) -> Result<TokenizedPrompt> {
        let (ids, unknown_words) = self.encode_tokens(prompt)?;
        let chunks = if ids.is_empty() {
            vec![self.empty_chunk()]
        } else {
            ids.chunks(self.tokens_per_chunk())
                .map(|c| self.wrap(c))
                .collect()
        };
        Ok(TokenizedPrompt {
            chunks,
            n_tokens: ids.len(),
            n_truncated: 0,
            unknown_words,
        })
    }

    /// Tokenizes a prompt into one chunk, dropping the tokens that do not fit, exactly as
    /// diffusers' pipelines and training scripts do. `n_truncated` says how many were dropped.
    pub fn tokenize_truncated(&self, prompt: &str) -> Result<TokenizedPrompt> {
        let (ids, unknown_words) = self.encode_tokens(prompt)?;
        let keep = ids.len().min(self.tokens_per_chunk());
        Ok(TokenizedPrompt {
            chunks: vec![self.wrap(&ids[..keep])],
            n_tokens: ids.len(),
            n_truncated: ids.len() - keep,
            unknown_words,
        })
    }

    /// Appends empty-prompt chunks until `prompt` has `n_chunks` chunks (AUTOMATIC1111 pads the
    /// shorter of prompt and negative prompt with the encoding of "").
    pub fn pad_to_chunks(&self, prompt: &mut TokenizedPrompt, n_chunks: usize) {
        while prompt.chunks.len() < n_chunks {
            prompt.chunks.push(self.empty_chunk());
        }
    }

    /// Pads every prompt to the largest chunk count among them, so that they batch together
    /// (e.g. a prompt and its negative prompt for classifier-free guidance).
    pub fn equalize_chunks(&self, prompts: &mut [TokenizedPrompt]) {
        let n = prompts.iter().map(|p| p.chunks.len()).max().unwrap_or(1);
        for p in prompts {
            self.pad_to_chunks(p, n);
        }
    }
}

/// Stacks tokenized prompts into a u32 tensor (B, n_chunks, max_length) for
/// `ClipTextModel::encode`. All prompts must have the same number of chunks
/// (see [`PromptTokenizer::equalize_chunks`]).
pub fn ids_tensor(prompts: &[TokenizedPrompt], device: &Device) -> Result<Tensor> {
    let first = prompts
        .first()
        .ok_or_else(|| anyhow!("no prompts to stack"))?;
    let (n, l) = (first.chunks.len(), first.chunks[0].len());
    let mut flat = Vec::with_capacity(prompts.len() * n * l);
    for (i, p) in prompts.iter().enumerate() {
        if p.chunks.len() != n {
            bail!(
                "prompt {i} has {} chunks, prompt 0 has {n}: equalize the chunk counts first",
                p.chunks.len()
            );
        }
        for c in &p.chunks {
            if c.len() != l {
                bail!("prompt {i} has a chunk of {} ids, expected {l}", c.len());
            }
            flat.extend_from_slice(c);
        }
    }
    Ok(Tensor::from_vec(flat, (prompts.len(), n, l), device)?)
}

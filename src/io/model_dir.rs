//! Finding a model: a local diffusers directory, a Hugging Face repo id, or the default model.
//!
//! A diffusers model directory holds `model_index.json` and one folder per component
//! (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, and `text_encoder_2/`,
//! `tokenizer_2/` for SDXL). Repo ids are fetched with hf-hub into the cache that Python tools
//! share (`HF_HOME`, `HF_HUB_CACHE`), so a model downloaded by diffusers is reused, and the
//! cache's snapshot folder is then used as the model directory.
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The name of the small model that ships with sd-rs (in `models/`).
pub const DEFAULT_MODEL_NAME: &str = "sd-rs-anime";

/// model_index.json: the pipeline class and, per component, its (library, class).
#[derive(Debug, Clone)]
pub struct ModelIndex {
    pub class_name: String,
    pub components: BTreeMap<String, (String, String)>,
}

impl ModelIndex {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("model_index.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} is not a diffusers model directory: {} is missing",
                dir.display(),
                path.display()
            )
        })?;
        Self::parse(&text).with_context(|| format!("reading {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let json: Value = serde_json::from_str(text)?;
        let obj = json
            .as_object()
            .context("model_index.json is not a JSON object")?;
        let class_name = obj
            .get("_class_name")
            .and_then(Value::as_str)
            .context("model_index.json has no _class_name")?
            .to_string();
        let mut components = BTreeMap::new();
        for (name, value) in obj {
            // Components are ["library", "Class"]; [null, null] marks an absent optional one.
            if let Some([Value::String(lib), Value::String(class)]) =
                value.as_array().map(|a| a.as_slice())
            {
                components.insert(name.clone(), (lib.clone(), class.clone()));
            }
        }
        Ok(Self {
            class_name,
            components,
        })
    }

    pub fn has(&self, component: &str) -> bool {
        self.components.contains_key(component)
    }
}

/// Where a `--model` value points.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Local(PathBuf),
    Hub(String),
}

impl ModelSource {
    /// A path that exists, or looks like one, is local; `owner/name` is a repo id.
    pub fn parse(spec: &str) -> Self {
        let path = Path::new(spec);
        let looks_like_repo = spec.split('/').count() == 2
            && !spec.starts_with('.')
            && !spec.starts_with('/')
            && !spec.contains('\\');
        if path.exists() || !looks_like_repo {
            ModelSource::Local(path.to_path_buf())
        } else {
            ModelSource::Hub(spec.to_string())
        }
    }
}

/// Resolves `--model` (or the default model when `None`) to a local diffusers directory.
/// `prefer_variant` (e.g. "fp16") picks `*.fp16.safetensors` files when a repo has them.
pub fn resolve_model(spec: Option<&str>, prefer_variant: Option<&str>) -> Result<PathBuf> {
    let Some(spec) = spec else {
        return default_model_dir();
    };
    match ModelSource::parse(spec) {
        ModelSource::Local(dir) => {
            if !dir.join("model_index.json").is_file() {
                bail!(
                    "{} is not a diffusers model directory (no model_index.json). Pass a folder \
                     with model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/, \
                     or a Hugging Face repo id such as stable-diffusion-v1-5/stable-diffusion-v1-5",
                    dir.display()
                );
            }
            Ok(dir)
        }
        ModelSource::Hub(repo) => fetch_from_hub(&repo, prefer_variant),
    }
}

/// The shipped default model: `$SD_RS_DEFAULT_MODEL`, else `models/sd-rs-anime` beside the
/// current directory, the executable (target/release/..) or the crate sources.
pub fn default_model_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("SD_RS_DEFAULT_MODEL") {
        return Ok(PathBuf::from(dir));
    }
    let mut candidates = vec![PathBuf::from("models").join(DEFAULT_MODEL_NAME)];
    if let Ok(exe) = std::env::current_exe() {
        for ancestor in exe.ancestors().skip(1).take(4) {
            candidates.push(ancestor.join("models").join(DEFAULT_MODEL_NAME));
        }
    }
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(DEFAULT_MODEL_NAME),
    );
    for dir in &candidates {
        if dir.join("model_index.json").is_file() {
            return Ok(dir.clone());
        }
    }
    let mut seen = std::collections::HashSet::new();
    candidates.retain(|c| seen.insert(c.clone()));
    bail!(
        "the default model {DEFAULT_MODEL_NAME} was not found (looked in: {}). It lives in the \
         sd-rs repository under models/{DEFAULT_MODEL_NAME} once trained (README, \"The default \
         model\", has the recipe); run sd-rs from the repository, set SD_RS_DEFAULT_MODEL to its \
         folder, or pass --model with a diffusers model folder or a Hugging Face repo id",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn hub_cache() -> hf_hub::Cache {
    // Python's huggingface_hub honours HF_HUB_CACHE before HF_HOME; do the same so both tools
    // share one cache.
    match std::env::var("HF_HUB_CACHE") {
        Ok(dir) => hf_hub::Cache::new(PathBuf::from(dir)),
        Err(_) => hf_hub::Cache::from_env(),
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"))
}

/// The files of a component that sd-rs reads, in order of preference per slot.
fn component_files(component: &str, siblings: &[String], variant: Option<&str>) -> Vec<String> {
    let in_dir = |f: &str| format!("{component}/{f}");
    let has = |f: &str| siblings.iter().any(|s| s == f);
    if component.starts_with("scheduler") {
        return vec![in_dir("scheduler_config.json")];
    }
    if component.starts_with("tokenizer") {
        return [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.json",
            "merges.txt",
        ]
        .iter()
        .map(|f| in_dir(f))
        .filter(|f| has(f))
        .collect();
    }
    let mut files = vec![in_dir("config.json")];
    let stems = ["diffusion_pytorch_model", "model"];
    let mut weights = None;
    for stem in stems {
        let variant_file = variant.map(|v| in_dir(&format!("{stem}.{v}.safetensors")));
        let plain = in_dir(&format!("{stem}.safetensors"));
        let index = in_dir(&format!("{stem}.safetensors.index.json"));
        if let Some(v) = variant_file.filter(|f| has(f)) {
            weights = Some(vec![v]);
        } else if has(&plain) {
            weights = Some(vec![plain]);
        } else if has(&index) {
            let prefix = in_dir(&format!("{stem}-"));
            let mut shards: Vec<String> = siblings
                .iter()
                .filter(|s| s.starts_with(&prefix) && s.ends_with(".safetensors"))
                .cloned()
                .collect();
            shards.push(index);
            weights = Some(shards);
        }
        if weights.is_some() {
            break;
        }
    }
    files.extend(weights.unwrap_or_default());
    files
}

fn fetch_from_hub(repo: &str, variant: Option<&str>) -> Result<PathBuf> {
    let cache = hub_cache().model(repo.to_string());
    if offline() {
        return cached_snapshot(repo, &cache);
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(hub_cache())
        .with_progress(true)
        .build()
        .context("setting up the Hugging Face Hub client")?;
    let api_repo = api.model(repo.to_string());
    let info = match api_repo.info() {
        Ok(info) => info,
        Err(err) => {
            // No network: fall back to what the cache has, with the clear error if incomplete.
            return cached_snapshot(repo, &cache)
                .with_context(|| format!("the Hub could not be reached ({err})"));
        }
    };
    let siblings: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let index_path = api_repo.get("model_index.json").with_context(|| {
        format!("{repo} has no model_index.json: is it a diffusers pipeline repo?")
    })?;
    let index = ModelIndex::read(index_path.parent().unwrap())?;
    for component in index.components.keys() {
        for file in component_files(component, &siblings, variant) {
            api_repo
                .get(&file)
                .with_context(|| format!("downloading {file} from {repo}"))?;
        }
    }
    Ok(index_path.parent().unwrap().to_path_buf())
}

/// Without a network, the cache must already hold the model.
fn cached_snapshot(repo: &str, cache: &hf_hub::CacheRepo) -> Result<PathBuf> {
    let where_to = hub_cache()
        .path()
        .join(format!("models--{}", repo.replace('/', "--")));
    let Some(index_path) = cache.get("model_index.json") else {
        bail!(
            "{repo} is not in the Hugging Face cache and the Hub cannot be used (offline). \
             Download it where there is a network, e.g. `huggingface-cli download {repo}` or \
             `sd-rs generate --model {repo} ...` once online, so that it lands in {} (set HF_HOME \
             or HF_HUB_CACHE to use another cache); or pass --model a local folder holding \
             model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/",
            where_to.display()
        );
    };
    let dir = index_path.parent().unwrap().to_path_buf();
    let index = ModelIndex::read(&dir)?;
    let missing: Vec<String> = index
        .components
        .keys()
        .filter(|c| !dir.join(c).is_dir())
        .map(|c| format!("{c}/"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "the cached copy of {repo} in {} lacks {}; download them while online",
            dir.display(),
            missing.join(", ")
        );
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_index_lists_components() {
        let index = ModelIndex::parse(
            r#"{"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
                "unet": ["diffusers", "UNet2DConditionModel"], "safety_checker": [null, null],
                "requires_safety_checker": false, "tokenizer": ["transformers", "CLIPTokenizer"]}"#,
        )
        .unwrap();
        assert_eq!(index.class_name, "StableDiffusionPipeline");
        assert_eq!(
            index.components.keys().collect::<Vec<_>>(),
            vec!["tokenizer", "unet"]
        );
        assert!(!index.has("safety_checker"));
    }

    #[test]
    fn sources_and_component_files() {
        assert_eq!(
            ModelSource::parse("org/name"),
            ModelSource::Hub("org/name".into())
        );
        assert_eq!(
            ModelSource::parse("./org/name"),
            ModelSource::Local("./org/name".into())
        );
        assert_eq!(
            ModelSource::parse("models"),
            ModelSource::Local("models".into())
        );
        let siblings: Vec<String> = [
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/model.safetensors",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            component_files("unet", &siblings, Some("fp16")),
            vec![
                "unet/config.json",
                "unet/diffusion_pytorch_model.fp16.safetensors"
            ]
        );
        assert_eq!(
            component_files("unet", &siblings, None),
            vec![
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors"
            ]
        );
        assert_eq!(
            component_files("text_encoder", &siblings, Some("fp16")),
            vec!["text_encoder/config.json", "text_encoder/model.safetensors"]
        );
        assert_eq!(
            component_files("tokenizer", &siblings, None),
            vec!["tokenizer/vocab.json", "tokenizer/merges.txt"]
        );
    }

    #[test]
    fn offline_without_cache_names_what_to_download() {
        let cache_dir = std::env::temp_dir().join(format!("sdrs-hfcache-{}", std::process::id()));
        let cache = hf_hub::Cache::new(cache_dir.clone()).model("org/missing".into());
        let err = cached_snapshot("org/missing", &cache)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("org/missing is not in the Hugging Face cache"),
            "{err}"
        );
        assert!(err.contains("model_index.json"), "{err}");
    }
}

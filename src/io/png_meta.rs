//! PNG files that remember how they were made.
//!
//! Every generated image carries a `parameters` text chunk in AUTOMATIC1111's format, so the
//! image can be inspected (`sd-rs info`) and re-made (`sd-rs generate --from-png`) by sd-rs and
//! read by the other tools of the ecosystem:
//!
//! ```text
//! anime girl, red hair
//! Negative prompt: blurry
//! Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model: sd-rs-anime
//! ```
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::Path;

/// The settings that produced one image.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    /// The sampler's AUTOMATIC1111 name, e.g. "Euler a".
    pub sampler: String,
    pub cfg_scale: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub model: Option<String>,
    /// img2img strength, written as A1111's "Denoising strength".
    pub denoising_strength: Option<f64>,
    /// Keys we do not interpret, kept in order so a round trip loses nothing.
    pub extra: Vec<(String, String)>,
}

impl GenerationParams {
    /// The `parameters` text in AUTOMATIC1111's layout.
    pub fn to_a1111(&self) -> String {
        let mut s = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            write!(s, "\nNegative prompt: {}", self.negative_prompt).unwrap();
        }
        let mut fields = vec![
            ("Steps".to_string(), self.steps.to_string()),
            ("Sampler".to_string(), self.sampler.clone()),
            ("CFG scale".to_string(), format_number(self.cfg_scale)),
            ("Seed".to_string(), self.seed.to_string()),
            (
                "Size".to_string(),
                format!("{}x{}", self.width, self.height),
            ),
        ];
        if let Some(model) = &self.model {
            fields.push(("Model".to_string(), model.clone()));
        }
        if let Some(strength) = self.denoising_strength {
            fields.push(("Denoising strength".to_string(), format_number(strength)));
        }
        fields.extend(self.extra.iter().cloned());
        let line: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{k}: {}", quote_if_needed(v)))
            .collect();
        write!(s, "\n{}", line.join(", ")).unwrap();
        s
    }

    /// Parses AUTOMATIC1111's `parameters` text. The last line holds the `Key: value` fields;
    /// a line starting with `Negative prompt:` starts the negative prompt; the rest is the prompt.
    pub fn from_a1111(text: &str) -> Result<Self> {
        let text = text.trim_end();
        let (body, fields_line) = match text.rfind('\n') {
            Some(i) => (&text[..i], &text[i + 1..]),
            None => ("", text),
        };
        let fields = parse_fields(fields_line);
        if !fields.iter().any(|(k, _)| k == "Steps") {
            bail!("no 'Steps: ...' line found in the parameters text: {text:?}");
        }
        let (prompt, negative_prompt) = match body.find("Negative prompt:") {
            Some(i) => (
                body[..i].trim_end_matches('\n').to_string(),
                body[i + "Negative prompt:".len()..].trim().to_string(),
            ),
            None => (body.to_string(), String::new()),
        };
        let mut params = GenerationParams {
            prompt,
            negative_prompt,
            steps: 0,
            sampler: String::new(),
            cfg_scale: 0.0,
            seed: 0,
            width: 0,
            height: 0,
            model: None,
            denoising_strength: None,
            extra: Vec::new(),
        };
        for (key, value) in fields {
            let bad = |what: &str| format!("bad {what} {value:?} in the parameters text");
            match key.as_str() {
                "Steps" => params.steps = value.parse().with_context(|| bad("Steps"))?,
                "Sampler" => params.sampler = value,
                "CFG scale" => {
                    params.cfg_scale = value.parse().with_context(|| bad("CFG scale"))?
                }
                "Seed" => params.seed = value.parse().with_context(|| bad("Seed"))?,
                "Size" => {
                    let (w, h) = value.split_once('x').with_context(|| bad("Size"))?;
                    params.width = w.trim().parse().with_context(|| bad("Size"))?;
                    params.height = h.trim().parse().with_context(|| bad("Size"))?;
                }
                "Model" => params.model = Some(value),
                "Denoising strength" => {
                    params.denoising_strength =
                        Some(value.parse().with_context(|| bad("Denoising strength"))?)
                }
                _ => params.extra.push((key, value)),
            }
        }
        Ok(params)
    }
}

/// Integers print without a fraction ("7", not "7.0"), as A1111 does.
fn format_number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

fn quote_if_needed(v: &str) -> String {
    if v.contains(',') || v.contains(':') || v.contains('"') {
        serde_json::to_string(v).unwrap()
    } else {
        v.to_string()
    }
}

/// Splits `Key: value, Key: "quoted, value", ...` respecting JSON-style quotes.
fn parse_fields(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let Some(colon) = rest.find(':') else { break };
        let key = rest[..colon].trim().to_string();
        let after = rest[colon + 1..].trim_start();
        let (value, remaining) = if after.starts_with('"') {
            match json_string_end(after) {
                Some(end) => {
                    let v = serde_json::from_str::<String>(&after[..end])
                        .unwrap_or_else(|_| after[1..end - 1].to_string());
                    (v, &after[end..])
                }
                None => (after.to_string(), ""),
            }
        } else {
            match after.find(", ") {
                Some(i) => (after[..i].trim().to_string(), &after[i..]),
                None => (after.trim().to_string(), ""),
            }
        };
        out.push((key, value));
        rest = remaining.trim_start_matches(',').trim_start();
    }
    out
}

/// Index just past the closing quote of a JSON string starting at `s[0] == '"'`.
fn json_string_end(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        match c {
            '\\' if !escaped => escaped = true,
            '"' if !escaped => return Some(i + 1),
            _ => escaped = false,
        }
    }
    None
}

/// Encodes an RGB8 image as PNG bytes with the `parameters` text chunk.
pub fn encode_png(rgb: &[u8], width: u32, height: u32, parameters: &str) -> Result<Vec<u8>> {
    if rgb.len() != (width * height * 3) as usize {
        bail!(
            "image buffer has {} bytes, expected {width}x{height}x3",
            rgb.len()
        );
    }
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        // tEXt is Latin-1 only; prompts in other scripts go in an iTXt chunk (UTF-8), as PIL does.
        if parameters.chars().all(|c| (c as u32) < 256) {
            encoder.add_text_chunk("parameters".to_string(), parameters.to_string())?;
        } else {
            encoder.add_itxt_chunk("parameters".to_string(), parameters.to_string())?;
        }
        let mut writer = encoder.write_header()?;
        writer.write_image_data(rgb)?;
        writer.finish()?;
    }
    Ok(bytes)
}

/// Writes an RGB8 image as PNG with its parameters, atomically.
pub fn write_png(path: &Path, rgb: &[u8], width: u32, height: u32, parameters: &str) -> Result<()> {
    let bytes = encode_png(rgb, width, height, parameters)?;
    super::write_atomic(path, &bytes)
}

/// Reads the `parameters` text chunk of a PNG, if it has one.
pub fn read_parameters(path: &Path) -> Result<Option<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder
        .read_info()
        .with_context(|| format!("{} is not a readable PNG", path.display()))?;
    let info = reader.info();
    for chunk in &info.uncompressed_latin1_text {
        if chunk.keyword == "parameters" {
            return Ok(Some(chunk.text.clone()));
        }
    }
    for chunk in &info.compressed_latin1_text {
        if chunk.keyword == "parameters" {
            return Ok(Some(chunk.get_text()?));
        }
    }
    for chunk in &info.utf8_text {
        if chunk.keyword == "parameters" {
            return Ok(Some(chunk.get_text()?));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GenerationParams {
        GenerationParams {
            prompt: "anime girl, red hair\nsecond line".into(),
            negative_prompt: "blurry, lowres".into(),
            steps: 20,
            sampler: "Euler a".into(),
            cfg_scale: 7.0,
            seed: 42,
            width: 512,
            height: 768,
            model: Some("runwayml/stable-diffusion-v1-5".into()),
            denoising_strength: Some(0.75),
            extra: vec![("Clip skip".into(), "2".into())],
        }
    }

    #[test]
    fn a1111_text_has_the_expected_layout() {
        let text = sample().to_a1111();
        assert_eq!(
            text,
            "anime girl, red hair\nsecond line\nNegative prompt: blurry, lowres\nSteps: 20, \
             Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x768, Model: \
             runwayml/stable-diffusion-v1-5, Denoising strength: 0.75, Clip skip: 2"
        );
    }

    #[test]
    fn a1111_round_trip_and_quoted_values() {
        let mut p = sample();
        p.model = Some("my, model: v2".into());
        assert_eq!(GenerationParams::from_a1111(&p.to_a1111()).unwrap(), p);
        let parsed = GenerationParams::from_a1111(
            "a cat\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 5.5, Seed: 7, Size: 64x64",
        )
        .unwrap();
        assert_eq!(parsed.prompt, "a cat");
        assert_eq!(parsed.negative_prompt, "");
        assert_eq!(parsed.sampler, "DPM++ 2M Karras");
        assert_eq!(parsed.cfg_scale, 5.5);
        assert!(GenerationParams::from_a1111("just a prompt").is_err());
    }

    #[test]
    fn png_carries_parameters_latin1_and_utf8() {
        let dir = std::env::temp_dir().join(format!("sdrs-png-{}", std::process::id()));
        for prompt in ["red hair", "赤い髪の少女"] {
            let mut p = sample();
            p.prompt = prompt.into();
            let path = dir.join("x.png");
            let rgb: Vec<u8> = (0..4 * 2 * 3).map(|i| i as u8 * 10).collect();
            write_png(&path, &rgb, 4, 2, &p.to_a1111()).unwrap();
            let text = read_parameters(&path).unwrap().unwrap();
            assert_eq!(GenerationParams::from_a1111(&text).unwrap(), p);
            let img = image::open(&path).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), (4, 2));
            assert_eq!(img.into_raw(), rgb);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}

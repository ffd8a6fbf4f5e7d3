//! Prompt files for scripted batch generation.
//!
//! Two line formats, mixed freely in one file:
//! - AUTOMATIC1111's "prompts from file": a bare prompt, or options such as
//!   `--prompt "a cat" --negative_prompt "blurry" --seed 1 --steps 20 --cfg_scale 7
//!   --width 512 --height 512 --sampler_name "Euler a" --batch_size 2`;
//! - JSON Lines: `{"prompt": "a cat", "seed": 1, "steps": 20}`.
//!
//! Empty lines and lines starting with `#` are skipped. A bad line is returned as an error with
//! its line number, so a batch can report it and still run the others.
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// One line's request. `None` means "use the command line's value".
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptJob {
    #[serde(skip)]
    pub line: usize,
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default, alias = "guidance_scale")]
    pub cfg_scale: Option<f64>,
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub height: Option<usize>,
    #[serde(default, alias = "sampler")]
    pub sampler_name: Option<String>,
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// How many batches of `batch_size` (A1111's `n_iter`).
    #[serde(default)]
    pub n_iter: Option<usize>,
}

impl PromptJob {
    /// Images this line asks for.
    pub fn num_images(&self, default_batch: usize) -> usize {
        self.batch_size.unwrap_or(default_batch) * self.n_iter.unwrap_or(1)
    }
}

/// An error on one line of a prompt file.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

/// Reads a prompt file: one entry per non-empty, non-comment line.
pub fn read_prompt_file(path: &Path) -> Result<Vec<std::result::Result<PromptJob, LineError>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading prompt file {}", path.display()))?;
    Ok(parse_prompt_lines(&text))
}

pub fn parse_prompt_lines(text: &str) -> Vec<std::result::Result<PromptJob, LineError>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(i, l)| {
            parse_line(l.trim())
                .map(|job| PromptJob { line: i + 1, ..job })
                .map_err(|e| LineError {
                    line: i + 1,
                    message: format!("{e:#}"),
                })
        })
        .collect()
}

fn parse_line(line: &str) -> Result<PromptJob> {
    let job = if line.starts_with('{') {
        serde_json::from_str::<PromptJob>(line).context("invalid JSON line")?
    } else if line.starts_with("--") {
        parse_options(line)?
    } else {
        PromptJob {
            prompt: line.to_string(),
            ..Default::default()
        }
    };
    if job.prompt.trim().is_empty() {
        bail!("the line has no prompt");
    }
    for (name, value) in [
        ("steps", job.steps),
        ("width", job.width),
        ("height", job.height),
    ] {
        if value == Some(0) {
            bail!("--{name} must be positive");
        }
    }
    Ok(job)
}

fn parse_options(line: &str) -> Result<PromptJob> {
    let words = shlex::split(line).context("unbalanced quotes")?;
    let mut job = PromptJob::default();
    let mut words = words.into_iter();
    while let Some(flag) = words.next() {
        let Some(name) = flag.strip_prefix("--") else {
            bail!("expected an option like --prompt, found {flag:?}");
        };
        let value = words
            .next()
            .with_context(|| format!("--{name} needs a value"))?;
        let number = |v: &str| -> Result<f64> {
            v.parse::<f64>()
                .with_context(|| format!("--{name}: {v:?} is not a number"))
        };
        let count = |v: &str| -> Result<usize> {
            v.parse::<usize>()
                .with_context(|| format!("--{name}: {v:?} is not a non-negative integer"))
        };
        match name {
            "prompt" => job.prompt = value,
            "negative_prompt" => job.negative_prompt = Some(value),
            "seed" => {
                job.seed = Some(
                    value
                        .parse()
                        .with_context(|| format!("--seed: {value:?}"))?,
                )
            }
            "steps" => job.steps = Some(count(&value)?),
            "cfg_scale" => job.cfg_scale = Some(number(&value)?),
            "width" => job.width = Some(count(&value)?),
            "height" => job.height = Some(count(&value)?),
            "sampler_name" => job.sampler_name = Some(value),
            "batch_size" => job.batch_size = Some(count(&value)?),
            "n_iter" => job.n_iter = Some(count(&value)?),
            other => bail!(
                "unknown option --{other} (known: --prompt --negative_prompt --seed --steps \
                 --cfg_scale --width --height --sampler_name --batch_size --n_iter)"
            ),
        }
    }
    Ok(job)
}

/// Parses a shard spec `i/n` (1-based i, as in "shard 1 of 4").
pub fn parse_shard(spec: &str) -> Result<(usize, usize)> {
    let parse = || -> Option<(usize, usize)> {
        let (i, n) = spec.split_once('/')?;
        Some((i.trim().parse().ok()?, n.trim().parse().ok()?))
    };
    match parse() {
        Some((i, n)) if n >= 1 && (1..=n).contains(&i) => Ok((i, n)),
        _ => bail!("--shard {spec:?} must look like i/n with 1 <= i <= n, e.g. 1/4"),
    }
}

/// Whether job number `index` (0-based, in file order) belongs to shard `i` of `n`.
/// Round-robin, so shards get equal shares even when prompts cluster in the file.
pub fn in_shard(index: usize, (i, n): (usize, usize)) -> bool {
    index % n == i - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_options_and_json_lines() {
        let text = "a cat\n\n# comment\n--prompt \"a dog, running\" --negative_prompt 'blurry' \
                    --seed 5 --steps 12 --cfg_scale 6.5 --width 256 --height 128 \
                    --sampler_name \"Euler a\" --batch_size 2 --n_iter 3\n\
                    {\"prompt\": \"a bird\", \"seed\": -1, \"guidance_scale\": 3}\n";
        let jobs: Vec<_> = parse_prompt_lines(text)
            .into_iter()
            .map(|j| j.unwrap())
            .collect();
        assert_eq!(jobs.len(), 3);
        assert_eq!(
            jobs[0],
            PromptJob {
                line: 1,
                prompt: "a cat".into(),
                ..Default::default()
            }
        );
        let j = &jobs[1];
        assert_eq!(j.line, 4);
        assert_eq!(j.prompt, "a dog, running");
        assert_eq!(j.negative_prompt.as_deref(), Some("blurry"));
        assert_eq!(
            (j.seed, j.steps, j.cfg_scale),
            (Some(5), Some(12), Some(6.5))
        );
        assert_eq!((j.width, j.height), (Some(256), Some(128)));
        assert_eq!(j.sampler_name.as_deref(), Some("Euler a"));
        assert_eq!(j.num_images(1), 6);
        assert_eq!(
            (jobs[2].line, jobs[2].seed, jobs[2].cfg_scale),
            (5, Some(-1), Some(3.0))
        );
    }

    #[test]
    fn bad_lines_name_their_line_and_reason() {
        let text = "ok prompt\n--prompt x --steps ten\n--bogus 1\n{\"prompt\": 1}\n--prompt \"x\n";
        let results = parse_prompt_lines(text);
        assert!(results[0].is_ok());
        let errs: Vec<_> = results[1..]
            .iter()
            .map(|r| r.clone().unwrap_err())
            .collect();
        assert_eq!(
            errs.iter().map(|e| e.line).collect::<Vec<_>>(),
            vec![2, 3, 4, 5]
        );
        assert!(errs[0].message.contains("--steps"), "{}", errs[0].message);
        assert!(
            errs[1].message.contains("unknown option --bogus"),
            "{}",
            errs[1].message
        );
        assert!(errs[2].message.contains("JSON"), "{}", errs[2].message);
        assert!(errs[3].message.contains("quotes"), "{}", errs[3].message);
    }

    #[test]
    fn shards_partition_the_jobs() {
        assert_eq!(parse_shard("2/3").unwrap(), (2, 3));
        assert!(parse_shard("0/3").is_err() && parse_shard("4/3").is_err());
        assert!(parse_shard("x").is_err());
        for n in 1..5 {
            for index in 0..20 {
                let owners = (1..=n).filter(|&i| in_shard(index, (i, n))).count();
                assert_eq!(owners, 1);
            }
        }
    }
}

//! Captioned training images.
//!
//! Three layouts, as users of diffusers and kohya's scripts have them:
//! - a JSON Lines file `{"file_name": "img/1.png", "text": "a cat"}` (`image` is accepted for
//!   `file_name`, `caption` for `text`), paths relative to the file;
//! - a folder holding such a file named `metadata.jsonl` (diffusers' imagefolder);
//! - a folder of images, each with a sidecar `.txt` caption (kohya).
//!
//! Problems (a bad line, a missing image) are collected with their file and line, so the trainer
//! can skip and count them, or stop on the first with `--strict`.
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp"];

#[derive(Debug, Clone, PartialEq)]
pub struct CaptionedImage {
    pub path: PathBuf,
    pub caption: String,
}

/// A problem with one entry of the dataset, named by file and line (line 0: the whole file).
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetProblem {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for DatasetProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
        } else {
            write!(f, "{}: {}", self.file.display(), self.message)
        }
    }
}

#[derive(Debug, Default)]
pub struct CaptionSet {
    pub items: Vec<CaptionedImage>,
    pub problems: Vec<DatasetProblem>,
}

/// Lists the captioned images at `source`: a .jsonl file, or a folder (metadata.jsonl or
/// sidecar .txt files).
pub fn read_captions(source: &Path) -> Result<CaptionSet> {
    if source.is_file() {
        return read_jsonl(source);
    }
    if !source.is_dir() {
        bail!(
            "{} does not exist: pass a captions .jsonl file or a folder of images",
            source.display()
        );
    }
    let metadata = source.join("metadata.jsonl");
    if metadata.is_file() {
        return read_jsonl(&metadata);
    }
    read_sidecar_folder(source)
}

#[derive(serde::Deserialize)]
struct Line {
    #[serde(alias = "image")]
    file_name: Option<String>,
    #[serde(alias = "caption")]
    text: Option<String>,
}

fn read_jsonl(path: &Path) -> Result<CaptionSet> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading captions file {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut set = CaptionSet::default();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let problem = |message: String| DatasetProblem {
            file: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let line: Line = match serde_json::from_str(raw) {
            Ok(l) => l,
            Err(e) => {
                set.problems
                    .push(problem(format!("not a JSON object: {e}")));
                continue;
            }
        };
        let (Some(file_name), Some(text)) = (line.file_name, line.text) else {
            set.problems.push(problem(
                "needs \"file_name\" (or \"image\") and \"text\" (or \"caption\")".to_string(),
            ));
            continue;
        };
        let image = base.join(&file_name);
        if !image.is_file() {
            set.problems
                .push(problem(format!("image {} not found", image.display())));
            continue;
        }
        set.items.push(CaptionedImage {
            path: image,
            caption: text,
        });
    }
    Ok(set)
}

fn read_sidecar_folder(dir: &Path) -> Result<CaptionSet> {
    let mut images: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_image(p))
        .collect();
    images.sort();
    let mut set = CaptionSet::default();
    for image in images {
        let txt = image.with_extension("txt");
        match std::fs::read_to_string(&txt) {
            Ok(caption) => set.items.push(CaptionedImage {
                path: image,
                caption: caption.trim().to_string(),
            }),
            Err(_) => set.problems.push(DatasetProblem {
                file: image.clone(),
                line: 0,
                message: format!("no caption file {}", txt.display()),
            }),
        }
    }
    Ok(set)
}

pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sdrs-captions-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("img")).unwrap();
        dir
    }

    #[test]
    fn jsonl_relative_paths_synonyms_and_problems() {
        let dir = scratch("jsonl");
        std::fs::write(dir.join("img/a.png"), b"x").unwrap();
        std::fs::write(dir.join("img/b.png"), b"x").unwrap();
        std::fs::write(
            dir.join("data.jsonl"),
            "{\"file_name\": \"img/a.png\", \"text\": \"red hair\"}\n\
             {\"image\": \"img/b.png\", \"caption\": \"blue hair\"}\n\
             not json\n\
             {\"file_name\": \"img/missing.png\", \"text\": \"x\"}\n\
             {\"text\": \"no file\"}\n",
        )
        .unwrap();
        let set = read_captions(&dir.join("data.jsonl")).unwrap();
        assert_eq!(set.items.len(), 2);
        assert_eq!(set.items[0].path, dir.join("img/a.png"));
        assert_eq!(set.items[1].caption, "blue hair");
        let lines: Vec<_> = set.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![3, 4, 5]);
        assert!(set.problems[1].to_string().contains("data.jsonl:4: image"));
        // A folder with metadata.jsonl reads the same way.
        std::fs::rename(dir.join("data.jsonl"), dir.join("metadata.jsonl")).unwrap();
        assert_eq!(read_captions(&dir).unwrap().items.len(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sidecar_captions() {
        let dir = scratch("sidecar");
        std::fs::write(dir.join("1.png"), b"x").unwrap();
        std::fs::write(dir.join("1.txt"), "a cat\n").unwrap();
        std::fs::write(dir.join("2.JPG"), b"x").unwrap();
        let set = read_captions(&dir).unwrap();
        assert_eq!(
            set.items,
            vec![CaptionedImage {
                path: dir.join("1.png"),
                caption: "a cat".into()
            }]
        );
        assert_eq!(set.problems.len(), 1);
        assert!(read_captions(&dir.join("nope")).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}

//! Helpers shared by the integration tests: running the real `sd-rs` binary (cli_generate,
//! cli_train, default_model), comparing tensors and recording the tensor names and shapes a
//! network asks for (the parity tests). Each integration test is its own crate and includes
//! this with `mod common;`.
#![allow(dead_code)] // not every test crate uses every helper

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

/// A fresh, empty folder `CARGO_TARGET_TMPDIR/<group>/<name>` for one test.
pub fn temp_dir(group: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(group)
        .join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What a run of the binary did.
pub struct Run {
    pub command: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> &Self {
        assert_eq!(
            self.code,
            Some(0),
            "`{}` should succeed:\n{}",
            self.command,
            self.stderr
        );
        self
    }

    /// A handled failure: exit code 1 with an `error:` line naming every needle, never a panic
    /// (exit code 101 with a backtrace).
    pub fn fails_with(&self, needles: &[&str]) -> &Self {
        assert!(
            !self.stderr.contains("panicked") && !self.stderr.contains("stack backtrace"),
            "`{}` panicked:\n{}",
            self.command,
            self.stderr
        );
        assert_eq!(
            self.code,
            Some(1),
            "`{}` should fail with exit code 1:\n{}",
            self.command,
            self.stderr
        );
        self.error_line();
        for needle in needles {
            assert!(
                self.stderr.contains(needle),
                "stderr of `{}` lacks {needle:?}:\n{}",
                self.command,
                self.stderr
            );
        }
        self
    }

    /// The first `error: ` line of stderr.
    pub fn error_line(&self) -> &str {
        self.stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("`{}` printed no error line:\n{}", self.command, self.stderr))
    }
}

/// Runs `sd-rs ARGS` from the repository root as a user on a machine without network would:
/// offline, with an empty Hugging Face cache under `home`, no stdin, and backtraces on (so that
/// a panic shows, which `fails_with` looks for).
pub fn sd_rs<S: AsRef<str>>(home: &Path, args: &[S]) -> Run {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let hf_home = home.join("hf-home");
    std::fs::create_dir_all(&hf_home).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sd-rs"))
        .args(&args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", &hf_home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("SD_RS_DEFAULT_MODEL")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("running sd-rs");
    Run {
        command: format!("sd-rs {}", args.join(" ")),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The largest absolute difference between two tensors of the same shape, computed in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// (tensor name, shape) pairs in the order a network asked for them.
pub type NamedShapes = Vec<(String, Vec<usize>)>;

/// A `VarBuilder` backend that records every requested tensor name and shape and hands out
/// broadcast zeros (no memory), so full-size architectures can be built in a test.
#[derive(Clone, Default)]
pub struct ShapeRecorder(std::sync::Arc<std::sync::Mutex<NamedShapes>>);

impl candle_nn::var_builder::SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .unwrap()
            .push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unexpected unchecked read of {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

impl ShapeRecorder {
    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, Device::Cpu)
    }

    /// (tensor count, parameter count, FNV-1a 64 of the sorted `name:d0,d1;` list), the
    /// signature scripts/make_unet_vae_fixtures.py records from diffusers' state_dict.
    pub fn signature(&self) -> (usize, usize, String) {
        let mut shapes = self.0.lock().unwrap().clone();
        shapes.sort();
        let text: String = shapes
            .iter()
            .map(|(name, dims)| {
                let dims: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
                format!("{name}:{};", dims.join(","))
            })
            .collect();
        let mut h: u64 = 0xcbf29ce484222325;
        for b in text.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        let n_params = shapes
            .iter()
            .map(|(_, d)| d.iter().product::<usize>())
            .sum();
        (shapes.len(), n_params, format!("{h:016x}"))
    }
}

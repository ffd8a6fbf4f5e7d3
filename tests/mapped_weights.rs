//! Weights used in place from memory-mapped files (src/mapped.rs): with `MappedAlloc` as the
//! global allocator, as the `sd-rs` binary has it, loaded tensors hold the same values as an
//! independent read of the file, mappings are released when their last tensor is freed, and a
//! buffer written or grown never touches the file.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use sd_rs::mapped::{mapped_files, MappedAlloc, MappedFile};
use sd_rs::model::weights::var_builder_from_files;

mod common;
use common::max_abs_diff;

#[global_allocator]
static ALLOC: MappedAlloc = MappedAlloc;

/// The tests count live mappings, which are global: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every tensor of `file` loaded through sd-rs's loader in `dtype`, checked against candle's
/// own (copying) reader, then freed: no mapping may outlive them.
fn check_loads_like_a_read(file: &str, dtype: DType) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let path = repo(file);
    let expected: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
        .collect();
    assert!(MappedAlloc::is_installed());
    let before = mapped_files();
    let vb = var_builder_from_files(std::slice::from_ref(&path), dtype, &Device::Cpu).unwrap();
    assert_eq!(mapped_files(), before + 1, "{file} is not mapped");
    let mut loaded = Vec::new();
    for (name, want) in &expected {
        let got = vb.get(want.dims(), name).unwrap();
        assert_eq!(got.dtype(), dtype);
        assert_eq!(
            max_abs_diff(&got, want),
            0.0,
            "{name} differs from the file"
        );
        loaded.push(got);
    }
    // The same tensor asked for again is a copy: freeing the first (which discards its pages)
    // leaves the second intact.
    let (name, want) = expected.iter().max_by_key(|(_, t)| t.elem_count()).unwrap();
    let again = vb.get(want.dims(), name).unwrap();
    drop(loaded);
    assert_eq!(
        again.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    drop(again);
    drop(vb);
    assert_eq!(
        mapped_files(),
        before,
        "{file} is still mapped after every tensor was freed"
    );
}

#[test]
fn f32_weights_are_used_in_place_and_match_the_file() {
    check_loads_like_a_read(
        "tests/fixtures/pipeline/sd15/unet/diffusion_pytorch_model.safetensors",
        DType::F32,
    );
}

#[test]
fn f16_weights_are_cast_from_the_mapping() {
    check_loads_like_a_read(
        "models/sd-rs-anime/unet/diffusion_pytorch_model.safetensors",
        DType::F32,
    );
}

#[test]
fn adopted_buffers_write_and_grow_without_changing_the_file() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("sd-rs-mapped-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("values.bin");
    // 4 header bytes, then 5000 f32 values (more than a page, so whole pages are discarded).
    let values: Vec<f32> = (0..5000).map(|i| i as f32 * 0.5).collect();
    let mut bytes = vec![7u8; 4];
    bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(&path, &bytes).unwrap();

    let before = mapped_files();
    let file = std::fs::File::open(&path).unwrap();
    let map = MappedFile::map(&file, bytes.len() as u64).unwrap();
    assert!(
        map.adopt::<f32>(2, 10).is_none(),
        "misaligned offset adopted"
    );
    assert!(
        map.adopt::<f32>(4, 5001).is_none(),
        "range past the end adopted"
    );
    let mut adopted: Vec<f32> = map.adopt(4, 5000).unwrap();
    assert_eq!(adopted, values);
    drop(map);
    assert_eq!(mapped_files(), before + 1, "released while a buffer lives");

    adopted[0] = -1.0;
    adopted.push(9.0); // moves the buffer to the heap and releases the mapping
    assert_eq!(mapped_files(), before);
    assert_eq!(adopted.len(), 5001);
    assert_eq!(adopted[0], -1.0);
    assert_eq!(&adopted[1..5000], &values[1..]);
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "the file was changed");
    std::fs::remove_dir_all(&dir).unwrap();
}

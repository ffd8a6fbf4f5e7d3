// Links MKL's static libraries (sequential threading layer) from $MKLROOT/lib, e.g. the PyPI
// wheel `mkl-static` installed with `pip install --prefix $MKLROOT`.
fn main() {
    let root = std::env::var("MKLROOT").expect("set MKLROOT (see README.md)");
    println!("cargo:rerun-if-env-changed=MKLROOT");
    println!("cargo:rustc-link-arg=-Wl,--start-group");
    for lib in ["mkl_intel_lp64", "mkl_sequential", "mkl_core"] {
        println!("cargo:rustc-link-arg={root}/lib/lib{lib}.a");
    }
    println!("cargo:rustc-link-arg=-Wl,--end-group");
    for lib in ["pthread", "m", "dl"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
}

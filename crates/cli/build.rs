//! Embed the LLM guest. It is built from source by scripts/build-guests.sh into
//! guests/target; a committed copy in guests/prebuilt serves users without a wasm toolchain.
use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../..");
    let built = root.join("guests/target/wasm32-unknown-unknown/release/llm.wasm");
    let prebuilt = root.join("guests/prebuilt/llm.wasm");
    println!("cargo:rerun-if-changed={}", built.display());
    println!("cargo:rerun-if-changed={}", prebuilt.display());
    println!("cargo:rerun-if-env-changed=SAMEPAGE_REQUIRE_BUILT_GUEST");
    let require_built = std::env::var_os("SAMEPAGE_REQUIRE_BUILT_GUEST").is_some();
    let src = if built.exists() {
        built
    } else if prebuilt.exists() && !require_built {
        println!("cargo:warning=using the committed guests/prebuilt/llm.wasm; run scripts/build-guests.sh to build it from source");
        prebuilt
    } else {
        panic!("the LLM guest is not built: run scripts/build-guests.sh first");
    };
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("llm.wasm");
    std::fs::copy(&src, &out).expect("copy the guest");
}

use which::which;

/// Building this crate needs bpf-linker; rebuild when it changes (a new LLVM, say).
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask build`, which installs it"),
    }
}

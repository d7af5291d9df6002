//! Embeds the benchmark's XDP object, which `relay`'s build script built along with the
//! relay's own (it passes its output directory as `links` metadata): one build of the eBPF
//! crate for both.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_RELAY_XDP_OBJECTS");
    let dir = std::env::var("DEP_RELAY_XDP_OBJECTS")
        .expect("relay's build script passes DEP_RELAY_XDP_OBJECTS");
    println!("cargo:rustc-env=RELAY_BENCH_OBJECT={dir}/relay-bench");
}

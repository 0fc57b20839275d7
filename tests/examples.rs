//! The examples run as part of `cargo test`: `cargo test` only builds `examples/`, so this
//! test includes the one that takes no arguments as a module and runs its `main`.

#[path = "../examples/custom_loop.rs"]
mod custom_loop;

#[test]
fn the_custom_loop_example_trains_and_exports() {
    custom_loop::main().unwrap();
    let out = std::env::temp_dir().join("dinotrain-custom-loop-teacher.safetensors");
    let file = dinotrain::io::TensorFile::read(&out).unwrap();
    assert!(
        file.tensors.contains_key("cls_token"),
        "{:?}",
        file.tensors.keys()
    );
}

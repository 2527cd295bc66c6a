fn main() -> std::process::ExitCode {
    checkplane_runtime::launch::main::<agent::Service>()
}

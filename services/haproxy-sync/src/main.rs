#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    checkplane_runtime::launch::main::<haproxy_sync::Service>()
}

//! `cn`: not implemented yet. It exits with an error rather than pretend to serve.

fn main() -> std::process::ExitCode {
    eprintln!(
        "cn: the coordinator is not implemented yet (a later issue builds it); refusing to start"
    );
    std::process::ExitCode::from(2)
}

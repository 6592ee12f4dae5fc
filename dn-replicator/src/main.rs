//! `dn_replicator`: not implemented yet. It exits with an error rather than pretend to work.

fn main() -> std::process::ExitCode {
    eprintln!("dn_replicator: the DN secondary is not implemented yet (a later issue builds it); refusing to start");
    std::process::ExitCode::from(2)
}

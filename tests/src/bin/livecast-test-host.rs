fn main() -> std::process::ExitCode {
    livecast::cli::main()
}

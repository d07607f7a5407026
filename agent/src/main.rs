fn main() -> std::process::ExitCode {
    zerotrace::cli::main()
}

fn main() -> std::process::ExitCode {
    sluice_launcher::main()
}

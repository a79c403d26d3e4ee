fn main() -> anyhow::Result<()> {
    sluice_router::main()
}

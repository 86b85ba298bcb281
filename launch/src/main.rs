//! `moe`: parse the command line, load the config, dispatch. Errors print as
//! `error: <paragraph>`; exit 2 for bad input, 1 for a failed run.

mod bench;
mod cli;
mod config_load;
mod config_reference;
mod device;
mod eval_cmd;
mod exit_code;
mod export_cmd;
mod generate_cmd;
mod gpu_driver;
mod import_cmd;
mod inspect_cmd;
mod launch_cmd;
mod overrides;
mod signals;
mod suggest;
mod tokenizer_cmd;
mod train_cmd;
mod tree_de;
mod world;
mod yaml_tree;

use clap::Parser;
use cli::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    // Before any other thread starts: keep freed tensor memory in the heap instead of returning
    // (and page-faulting in again) every large block each step; see the function's docs.
    bench::keep_freed_memory();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code::exit_code(&e))
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let processes = world::launcher_processes().unwrap_or(1);
    match cli.command {
        Command::Train(a) => {
            let loaded = config_load::load(&a.config.config, &a.config.set)?;
            let world_size = world::world_size(&loaded.config, a.debug, processes);
            let launch_errs = world::launch_errors(&loaded.config, a.debug, processes);
            loaded.validate(world_size, launch_errs)?;
            let opts = train_cmd::TrainOpts {
                debug: a.debug,
                resume: a.resume,
                world_size,
                processes,
                config_path: loaded.path,
                overrides: loaded.overrides,
            };
            train_cmd::run_train(loaded.config, opts)
        }
        Command::Check(a) => {
            let loaded = config_load::load(&a.config.config, &a.config.set)?;
            let world_size = (a.world_size)
                .unwrap_or_else(|| world::world_size(&loaded.config, a.debug, processes));
            let launch_errs = world::launch_errors(&loaded.config, a.debug, processes);
            loaded.validate(world_size, launch_errs)?;
            print!("{}", config_load::to_yaml(&loaded.config)?);
            Ok(())
        }
        Command::ConfigReference => {
            print!("{}", config_reference::render()?);
            Ok(())
        }
        Command::Eval(a) => eval_cmd::run_eval(&a.checkpoint, a.config.as_deref(), &a.set),
        Command::Generate(a) => generate_cmd::run_generate(&a),
        Command::Inspect(a) => inspect_cmd::run_inspect(&a),
        Command::Launch(a) => {
            let code = launch_cmd::run_launch(a.np as usize, a.hostfile.as_deref(), &a.args)?;
            std::process::exit(code)
        }
        Command::Bench(a) => bench::run(*a),
        Command::Export(a) => export_cmd::run_export(&a),
        Command::Import(a) => import_cmd::run_import(&a),
        Command::Tokenizer(a) => tokenizer_cmd::run_tokenizer(&a),
        Command::Data(a) => tokenizer_cmd::run_data(&a),
    }
}

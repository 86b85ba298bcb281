//! `moe`: parse the command line, load the config, dispatch. Errors print as
//! `error: <paragraph>`; exit 2 for bad input, 1 for a failed run.

mod cli;
mod config_load;
mod config_reference;
mod device;
mod exit_code;
mod launch_cmd;
mod overrides;
mod signals;
mod suggest;
mod train_cmd;
mod tree_de;
mod world;
mod yaml_tree;

use clap::Parser;
use cli::{Cli, Command};
use exit_code::BadInput;
use std::process::ExitCode;

fn main() -> ExitCode {
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
        Command::Eval(_) => not_yet("eval"),
        Command::Generate(_) => not_yet("generate"),
        Command::Inspect(_) => not_yet("inspect"),
        Command::Launch(a) => {
            let code = launch_cmd::run_launch(a.np as usize, a.hostfile.as_deref(), &a.args)?;
            std::process::exit(code)
        }
        Command::Bench(_) => not_yet("bench"),
    }
}

fn not_yet(cmd: &str) -> anyhow::Result<()> {
    Err(BadInput(format!("`moe {cmd}` is not implemented yet")).into())
}

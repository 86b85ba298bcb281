//! `moe`: parse the command line, load the config, dispatch. Errors print as
//! `error: <paragraph>`; exit 2 for bad input, 1 for a failed run.

mod bench;
mod ckpt_lookup;
mod ckpt_mismatch;
mod cli;
mod config_load;
mod config_reference;
mod data_check;
mod device;
mod error_line;
mod eval_cmd;
mod exit_code;
mod export_cmd;
mod generate_cmd;
mod gpu_driver;
mod heap;
mod import_cmd;
mod inspect_cmd;
mod launch_cmd;
mod overrides;
mod run_dir;
mod run_log;
mod schedule_fit;
mod signals;
mod slim_cmd;
mod suggest;
mod surgery_ranks;
mod threads;
mod tokenizer_cmd;
mod train_cmd;
mod tree_de;
mod upcycle_cmd;
mod world;
mod yaml_tree;

use clap::Parser;
use cli::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any other thread starts; `heap` says which command needs which and why.
    if let Some(p) = heap::policy(&cli.command) {
        heap::apply(p);
    }
    if matches!(cli.command, Command::Train(_)) && world::launcher_rank() == 0 {
        // Rank 0's output also goes to <run.out_dir>/train.log; started while this process
        // has one thread and no MPI, see run_log.
        run_log::start(&run_log::command_line());
    }
    let code = match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error_line::print(&e);
            ExitCode::from(exit_code::exit_code(&e))
        }
    };
    run_log::finish();
    code
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let launcher = world::launcher_processes();
    let processes = launcher.unwrap_or(1);
    match cli.command {
        Command::Train(a) => {
            let (loaded, world_size) = load_for_run(&a.config, a.debug, processes, |cfg| {
                world::world_size(cfg, a.debug, processes)
            })?;
            // Live redraws garble log files and interleave across ranks: plain lines unless
            // asked, or on a terminal with one rank.
            let live_progress = match a.progress {
                Some(p) => p == cli::ProgressArg::Live,
                None => run_log::stdout_is_terminal() && world_size == 1 && processes == 1,
            };
            let opts = train_cmd::TrainOpts {
                debug: a.debug,
                resume: a.resume,
                overwrite: a.overwrite,
                init_from: a.init_from,
                live_progress,
                world_size,
                processes,
                config_path: loaded.path,
                overrides: loaded.overrides,
            };
            train_cmd::run_train(loaded.config, opts)
        }
        Command::Check(a) => {
            // `check` runs exactly what `train` runs before it starts anything.
            let (loaded, _) = load_for_run(&a.config, a.debug, processes, |cfg| {
                a.world_size
                    .unwrap_or_else(|| world::check_world_size(cfg, a.debug, launcher))
            })?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&loaded.config)?);
            } else {
                print!("{}", config_load::to_yaml(&loaded.config)?);
            }
            Ok(())
        }
        Command::ConfigReference => {
            print!("{}", config_reference::render()?);
            Ok(())
        }
        Command::Eval(a) => eval_cmd::run_eval(&a.checkpoint, a.config.as_deref(), &a.set, a.json),
        Command::Generate(a) => generate_cmd::run_generate(&a),
        Command::Inspect(a) => inspect_cmd::run_inspect(&a),
        Command::Launch(a) => {
            if let Some(h) = a.hostfile.as_deref().filter(|h| !h.is_file()) {
                return Err(exit_code::BadInput(format!(
                    "--hostfile {}: no such file",
                    h.display()
                ))
                .into());
            }
            let code = launch_cmd::run_launch(a.np as usize, a.hostfile.as_deref(), &a.args)?;
            std::process::exit(code)
        }
        Command::Bench(a) => bench::run(*a),
        Command::Export(a) => export_cmd::run_export(&a),
        Command::Import(a) => import_cmd::run_import(&a),
        Command::Slim(a) => slim_cmd::run_slim(&a),
        Command::Upcycle(a) => upcycle_cmd::run_upcycle(&a),
        Command::Tokenizer(a) => tokenizer_cmd::run_tokenizer(&a),
        Command::Data(a) => tokenizer_cmd::run_data(&a),
    }
}

/// What `train` and `check` do before a run: load the config, fit the schedule, and validate
/// it for the world size `world_size` gives, with the launcher's and the data's findings.
fn load_for_run(
    args: &cli::ConfigArgs,
    debug: bool,
    processes: i64,
    world_size: impl FnOnce(&moe_trainer::config::ExperimentConfig) -> i64,
) -> anyhow::Result<(config_load::LoadedConfig, i64)> {
    let mut loaded = config_load::load(&args.config, &args.set)?;
    warn_fitted_schedule(&mut loaded.config);
    let world_size = world_size(&loaded.config);
    let mut launch_errs = world::launch_errors(&loaded.config, debug, processes);
    launch_errs.extend(data_check::missing_data(&loaded.config));
    loaded.validate(world_size, launch_errs)?;
    Ok((loaded, world_size))
}

/// Clamps the schedule to short runs (`schedule_fit`), one warning line each, printed by rank
/// 0 only under mpirun.
fn warn_fitted_schedule(cfg: &mut moe_trainer::config::ExperimentConfig) {
    for w in schedule_fit::fit_schedule(cfg) {
        if world::launcher_rank() == 0 {
            eprintln!("warning: {w}");
        }
    }
}

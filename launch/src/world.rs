//! The world size a config is validated for, known before MPI starts: mpirun's launcher
//! exports it to every rank's environment (OpenMPI `OMPI_COMM_WORLD_SIZE`, MPICH/Hydra and
//! Slurm PMI `PMI_SIZE`).

use moe_trainer::config::{Backend, ExperimentConfig};

/// Processes started by the MPI launcher, or `None` outside one.
pub fn launcher_processes() -> Option<i64> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|var| std::env::var(var).ok()?.trim().parse::<i64>().ok())
        .filter(|&n| n > 0)
}

/// This process's rank under an MPI launcher (0 outside one), known before MPI starts: only
/// rank 0 prints what every rank would print alike (config warnings).
pub fn launcher_rank() -> i64 {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK"]
        .iter()
        .find_map(|var| std::env::var(var).ok()?.trim().parse::<i64>().ok())
        .unwrap_or(0)
}

/// Ranks the run will have: in debug mode and with the threads backend the process runs
/// `parallel.ep_size` in-process ranks (several such processes under mpirun are refused by
/// [`launch_errors`], so they do not multiply); otherwise one rank per process.
pub fn world_size(cfg: &ExperimentConfig, debug: bool, processes: i64) -> i64 {
    if debug || cfg.parallel.backend == Backend::Threads {
        cfg.parallel.ep_size.max(1)
    } else {
        processes
    }
}

/// The world size `moe check` validates for without `--world-size`: the mpirun world under
/// mpirun, else the smallest world the config runs on (`parallel.ep_size` ranks).
pub fn check_world_size(cfg: &ExperimentConfig, debug: bool, processes: Option<i64>) -> i64 {
    match processes {
        Some(p) => world_size(cfg, debug, p),
        None => cfg.parallel.ep_size.max(1),
    }
}

/// Launch problems the config rules cannot see: in-process ranks under mpirun.
pub fn launch_errors(cfg: &ExperimentConfig, debug: bool, processes: i64) -> Vec<String> {
    let mut errs = Vec::new();
    if processes > 1 && debug {
        errs.push(format!(
            "--debug runs every rank in one process, but mpirun started {processes} processes"
        ));
    } else if processes > 1 && cfg.parallel.backend == Backend::Threads {
        errs.push(format!(
            "parallel.backend (threads) runs every rank in one process, but mpirun started \
             {processes} processes"
        ));
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_and_debug_multiply_by_ep_size() {
        let mut cfg = ExperimentConfig::default();
        cfg.parallel.ep_size = 4;
        assert_eq!(world_size(&cfg, false, 1), 1);
        assert_eq!(world_size(&cfg, false, 8), 8);
        assert_eq!(world_size(&cfg, true, 1), 4);
        // `mpirun -np 2 moe train --debug` is refused; its message names 4 ranks, not 8.
        assert_eq!(world_size(&cfg, true, 2), 4);
        assert_eq!(check_world_size(&cfg, false, None), 4);
        assert_eq!(check_world_size(&cfg, false, Some(8)), 8);
        cfg.parallel.backend = Backend::Threads;
        assert_eq!(world_size(&cfg, false, 1), 4);
        assert_eq!(world_size(&cfg, false, 2), 4);
    }

    #[test]
    fn in_process_ranks_refuse_mpirun() {
        let mut cfg = ExperimentConfig::default();
        assert!(launch_errors(&cfg, false, 4).is_empty());
        assert!(launch_errors(&cfg, true, 1).is_empty());
        assert!(launch_errors(&cfg, true, 2)[0].contains("--debug"));
        cfg.parallel.backend = Backend::Threads;
        assert!(launch_errors(&cfg, false, 1).is_empty());
        assert!(launch_errors(&cfg, false, 2)[0].contains("parallel.backend (threads)"));
    }
}

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

/// Ranks the run will have: in debug mode and with the threads backend each process runs
/// `parallel.ep_size` in-process ranks; otherwise one rank per process.
pub fn world_size(cfg: &ExperimentConfig, debug: bool, processes: i64) -> i64 {
    if debug || cfg.parallel.backend == Backend::Threads {
        processes * cfg.parallel.ep_size.max(1)
    } else {
        processes
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
        cfg.parallel.backend = Backend::Threads;
        assert_eq!(world_size(&cfg, false, 1), 4);
        assert_eq!(world_size(&cfg, false, 2), 8);
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

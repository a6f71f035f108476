//! End-to-end test support: finds the workspace's binaries in the target directory and runs
//! them as child processes.

mod cluster;
mod config;
mod crash;
mod faults;
mod loadgen;
mod logs;
mod seed;
mod supervision;

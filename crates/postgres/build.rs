//! `sqlx::migrate!` embeds the migrations at compile time; rebuild when one
//! is added or changed (cargo does not track the directory by itself).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}

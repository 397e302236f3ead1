//! libpg_query and librdkafka both bundle xxHash; a target that calls the PostgreSQL scanner
//! pulls in both copies. They are the same code, so the first definition may win.
fn main() {
    println!("cargo:rustc-link-arg-bin=approver_copy=-Wl,--allow-multiple-definition");
}

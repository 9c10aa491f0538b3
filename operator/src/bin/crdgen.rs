//! Prints the `KmeshConfig` CRD manifest. The checked-in copy is regenerated with
//! `cargo run -p kmesh-operator --bin crdgen > crds/kmesh.net_kmeshconfigs.yaml`.

fn main() {
    // The same function the drift test compares against, so the output is exactly the file.
    print!("{}", kmesh_operator::crd::crd_yaml());
}

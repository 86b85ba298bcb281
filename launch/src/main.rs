fn main() {
    println!("moe");
}

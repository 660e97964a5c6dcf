//! `wrong-world`: a valid component of some other world (it exports a greeting, not weir's
//! handler). Used to test that weir refuses it with a clear error.

wit_bindgen::generate!({
    inline: "package example:other; world greeter { export greet: func(name: string) -> string; }",
});

struct Greeter;

impl Guest for Greeter {
    fn greet(name: String) -> String {
        format!("hello, {name}")
    }
}

export!(Greeter);

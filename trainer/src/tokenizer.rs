//! Text tokenizers: a `tokenizer.json` read and trained with Hugging Face's `tokenizers`
//! crate, the format `transformers`' `PreTrainedTokenizerFast` reads. Training makes a
//! byte-level BPE (GPT-2's scheme, Radford et al. 2019; Sennrich et al. 2016 for BPE): every
//! byte is in the alphabet, so any text encodes and decodes back exactly, with no unknown
//! token. No normalizer and no prefix space are added, so `decode(encode(s)) == s`.

use crate::error::{Result, TrainError};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{Tokenizer, TokenizerBuilder};

/// A loaded `tokenizer.json` and its identity.
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    sha256: String,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> TrainError {
    TrainError::File {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl TextTokenizer {
    /// Reads `path` (a `tokenizer.json`). Errors name the file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
        let inner = Tokenizer::from_bytes(&bytes).map_err(|e| {
            bad(
                path,
                format!("not a tokenizer.json the tokenizers crate reads: {e}"),
            )
        })?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            sha256: sha256_hex(&bytes),
        })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// sha256 of the `tokenizer.json` bytes: identifies the tokenizer data was made with.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Ids the tokenizer can produce: the model's vocabulary plus added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether the tokenizer is GPT-2's byte-level scheme with its split rule and no
    /// normalizer (what [`train_bpe`] makes): the encoding of a text is then the concatenation
    /// of the encodings of pieces cut right after a newline between two non-spaces.
    pub fn splits_like_gpt2(&self) -> bool {
        let level = matches!(
            self.inner.get_pre_tokenizer(),
            Some(PreTokenizerWrapper::ByteLevel(b)) if b.use_regex && !b.add_prefix_space
        );
        level && self.inner.get_normalizer().is_none()
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| bad(&self.path, format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| bad(&self.path, format!("decoding failed: {e}")))
    }
}

/// Trains a byte-level BPE of `vocab_size` ids (256 bytes plus merges) on the UTF-8 text
/// files `inputs` and returns its `tokenizer.json` text. Deterministic for the same inputs.
pub fn train_bpe(inputs: &[PathBuf], vocab_size: usize) -> Result<String> {
    let alphabet = ByteLevel::alphabet().len();
    if vocab_size < alphabet {
        return Err(TrainError::Other(format!(
            "--vocab-size ({vocab_size}) must be at least {alphabet} (one id per byte)"
        )));
    }
    for p in inputs {
        let text = std::fs::read(p).map_err(|e| TrainError::io(p, e))?;
        if let Err(e) = std::str::from_utf8(&text) {
            return Err(bad(p, format!("not UTF-8 text ({e})")));
        }
    }
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(0)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let level = ByteLevel::new(false, true, true);
    let mut tok = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<NormalizerWrapper>)
        .with_pre_tokenizer(Some(level))
        .with_post_processor(Some(level))
        .with_decoder(Some(level))
        .build()
        .map_err(|e| TrainError::Other(format!("building the tokenizer: {e}")))?;
    let files = inputs.iter().map(|p| p.display().to_string()).collect();
    tok.train_from_files(&mut trainer, files)
        .map_err(|e| TrainError::Other(format!("training the tokenizer: {e}")))?;
    tok.to_string(true)
        .map_err(|e| TrainError::Other(format!("serialising the tokenizer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BPE trained on a repetitive text merges its frequent pairs (fewer ids than bytes),
    /// round-trips any text exactly (including bytes never seen in training), and trains to
    /// the same file twice.
    #[test]
    fn trains_encodes_and_round_trips() {
        let dir = std::env::temp_dir().join(format!("moe-tok-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.txt");
        std::fs::write(&input, "the cat sat on the mat. ".repeat(200)).unwrap();
        let json = train_bpe(std::slice::from_ref(&input), 300).unwrap();
        assert_eq!(json, train_bpe(std::slice::from_ref(&input), 300).unwrap());
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, &json).unwrap();
        let tok = TextTokenizer::load(&path).unwrap();
        assert!(
            tok.vocab_size() > 256 && tok.vocab_size() <= 300,
            "{}",
            tok.vocab_size()
        );
        let text = "the cat sat on the mat.";
        let ids = tok.encode(text).unwrap();
        assert!(ids.len() < text.len(), "{ids:?}");
        assert_eq!(tok.decode(&ids).unwrap(), text);
        let odd = "Zebra ünïcödé \u{1F600}\n\ttabs";
        assert_eq!(tok.decode(&tok.encode(odd).unwrap()).unwrap(), odd);
        assert_eq!(tok.sha256(), sha256_hex(json.as_bytes()));
        assert!(train_bpe(std::slice::from_ref(&input), 100).is_err());
        std::fs::write(&path, "{not json").unwrap();
        let err = TextTokenizer::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("not a tokenizer.json"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

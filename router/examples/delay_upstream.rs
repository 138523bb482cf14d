//! A minimal keep-alive HTTP/1.1 upstream that answers every request with the same
//! JSON body after a fixed delay. Used by `bench/shadow.sh` for equal and 10× slower
//! shadow targets. Usage: `delay_upstream ADDR DELAY_MS`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:3001".into());
    let delay = Duration::from_millis(args.next().and_then(|d| d.parse().ok()).unwrap_or(0));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let body = r#"{"id":7,"status":"paid","total_cents":1250,"items":[{"sku":"A","qty":2}]}"#;
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    loop {
        let (mut stream, _) = listener.accept().await?;
        let response = response.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut filled = 0;
            loop {
                match stream.read(&mut buf[filled..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => filled += n,
                }
                // Answer each complete request head (bodiless GETs) in order.
                while let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
                    buf.copy_within(end + 4..filled, 0);
                    filled -= end + 4;
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    if stream.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
                if filled == buf.len() {
                    return;
                }
            }
        });
    }
}

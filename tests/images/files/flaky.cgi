#!/bin/sh
# GET /cgi-bin/flaky: answers 500 on about one request in five, else 200.
if [ $((RANDOM % 5)) -eq 0 ]; then
    printf 'Status: 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\nflaky error\n'
else
    printf 'Content-Type: text/plain\r\n\r\n'
    cat /etc/release
fi

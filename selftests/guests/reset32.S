/* SPDX-License-Identifier: GPL-2.0 */
/*
 * A multiboot kernel that resets the machine the three ways a PC offers, counting its
 * boots in CMOS RAM (byte 0x40, which a reset keeps): port 0x92 bit 0 on the first
 * boot, the reset control register at 0xcf9 (RST_CPU) on the second, the keyboard
 * controller's reset pulse (0xfe to port 0x64) on the third; the fourth exits with 0x2a.
 */
	.intel_syntax noprefix
	.code32
	.text
	.globl _start
	.set MB_FLAGS, 0
	.balign 4
mbh:	.long	0x1badb002, MB_FLAGS, -(0x1badb002 + MB_FLAGS)
_start:
	mov	esp, 0x8000
	mov	al, 0x40
	out	0x70, al
	in	al, 0x71
	inc	al
	mov	bl, al
	mov	al, 0x40
	out	0x70, al
	mov	al, bl
	out	0x71, al
	lea	esi, s_boot
	call	puts
	mov	al, bl
	add	al, '0'
	call	putc
	mov	al, '\n'
	call	putc
	cmp	bl, 1
	je	1f
	cmp	bl, 2
	je	2f
	cmp	bl, 3
	je	3f
	mov	al, 0x2a
	out	0xf4, al
	hlt
1:	in	al, 0x92
	or	al, 1
	out	0x92, al
	jmp	4f
2:	mov	dx, 0xcf9
	mov	al, 6
	out	dx, al
	jmp	4f
3:	mov	al, 0xfe
	out	0x64, al
	/* Not reached: a reset ends this boot. */
4:	lea	esi, s_stuck
	call	puts
	mov	al, 1
	out	0xf4, al
	hlt

/* puts(esi): bytes up to NUL to COM1; putc(al). */
puts:	lodsb
	test	al, al
	jz	5f
	call	putc
	jmp	puts
5:	ret
putc:	mov	dx, 0x3f8
	out	dx, al
	ret

s_boot:	.asciz "boot "
s_stuck: .asciz "the reset did not happen\n"
